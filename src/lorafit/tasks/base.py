"""The LightningModule base every task shares: a transformers model with LoRA layers, its optimizer
and schedule, timing, and checkpoints that hold trainable tensors only.

A task is a subclass (`tasks/causal_lm.py`, `tasks/classification.py`) that adds its loss and
metrics and says, through class attributes, how `lorafit.train` builds and saves it; the `task`
config group names the subclass (`_target_`), so adding a task is one module and one YAML file.

One training batch is one optimizer step (`lorafit.data.sampling.StepLoader`): the module steps the
optimizer itself (Lightning's manual optimization), because a step's loss is divided by the
supervised count of the whole step (all micro-batches, all devices), which Lightning's automatic
accumulation cannot know before the first micro-batch's backward pass.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric

from lorafit.lora import param_groups
from lorafit.tasks import faults

FSDP_PREFIX = "_fsdp_wrapped_module."  # in parameter names of modules FSDP wrapped in place


def dropout_rates(model: nn.Module) -> list[float]:
    """The distinct nonzero dropout probabilities that act in `model`'s current mode: its
    `nn.Dropout` modules in train mode (LoRA's, BERT's) and a config's `attention_dropout`
    (Llama's, applied functionally in training). Empty: training runs without dropout."""
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0}
    attention = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    if attention > 0 and model.training:
        rates.add(float(attention))
    return sorted(rates)


class LoRAModule(L.LightningModule):
    """Frozen transformers model + LoRA layers; subclasses add their loss and validation.

    Only parameters with `requires_grad` (the LoRA matrices after `inject_lora`, and a task's new
    head) reach the optimizer and the checkpoints; resuming loads them back onto the same base.

    A subclass defines `summed_loss(batch)` (its loss summed over the units it averages over:
    supervised tokens, examples) and `loss_count(batch)` (how many units); `training_step` here
    turns them into one optimizer step.

    Class attributes (what `lorafit.train` reads before the module exists):
        name: the task's name (`causal_lm`), also the `lorafit.models.AUTO_CLASSES` key.
        peft_task_type: PEFT's `task_type` written in `adapter_config.json`.
        loss_label: y-axis label of `loss_curve.png`.
        loss_unit: what the loss is a mean over (`supervised tokens`), for the log.
        heads: last names of new output modules trained fully and saved whole (PEFT's
            `modules_to_save`).

    Args:
        model: a transformers model whose LoRA layers are already injected.
        optimizer: partial optimizer (`_partial_: true` config), called with the trainable params.
        scheduler: partial schedule called with `optimizer` and `num_training_steps`, or None.
        gradient_clip_val: clip the gradient norm of each step to this (None or 0: no clipping);
            `trainer.gradient_clip_val`, which Lightning refuses under manual optimization.
        skip_nonfinite_batches: steps with a non-finite loss or gradient norm that are skipped
            (no update, counted) before the run stops with `faults.NonFiniteError`.
    """

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""
    loss_label: ClassVar[str] = "loss"
    loss_unit: ClassVar[str] = "examples"
    heads: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        gradient_clip_val: float | None = None,
        skip_nonfinite_batches: int = 0,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = False  # training_step runs the optimizer step (see above)
        self.val_loss = MeanMetric()  # weighted by what the task's loss averages over
        self.strict_loading = False  # checkpoints hold trainable tensors only; checked below
        # Totals over training steps (forward + backward + optimizer), for metrics.json; they go
        # into checkpoints, so a resumed run counts the whole run.
        self.train_tokens, self.train_time = 0, 0.0
        self._saved_at_step = -1  # global step of the last checkpoint this module was saved in
        self._stop_checkpoint: dict | None = None  # last.ckpt as saved at the stopping step
        self._saving_stop = False
        self._train_loader_state: dict | None = None  # from a checkpoint, for on_train_start
        self._grads_checked = False  # check_unused_parameters runs once, on the first step
        self.skip_nonfinite_batches, self.skipped_nonfinite = skip_nonfinite_batches or 0, 0
        self.signals = faults.SignalWatch()  # Ctrl-C / SIGTERM: stop at a step boundary
        self._rng_state: dict | None = None  # from a checkpoint, for on_train_start
        self.last_fit_validation: tuple[int, dict[str, float]] | None = None

    # -- what train.py asks of a task ------------------------------------------------------------

    @classmethod
    def head_names(cls, model: nn.Module) -> list[str]:
        """Full names of the modules of `model` whose last name part is one of `heads`."""
        return [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in cls.heads]

    @staticmethod
    def model_kwargs(datamodule: Any) -> dict[str, Any]:
        """`from_pretrained` kwargs the data decides (e.g. `num_labels`); none by default."""
        return {}

    def after_fit(self, trainer: L.Trainer, datamodule: Any, run_dir: Path) -> dict[str, Any]:
        """Extra metrics.json entries after training (test-split metrics, pictures); none here.
        Every rank calls it (an evaluation in it needs them all); only rank 0 may write files."""
        return {}

    # -- Lightning hooks --------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> the model's logits ((B, T, V) for a causal LM, (B, C) classes)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's loss on `batch`, summed (not averaged) over its `loss_count` units."""
        raise NotImplementedError

    @staticmethod
    def loss_count(batch: dict[str, torch.Tensor]) -> int:
        """How many units (supervised tokens, examples) the task's loss averages over in `batch`."""
        raise NotImplementedError

    def training_step(self, step: dict | list[dict], batch_idx: int) -> torch.Tensor:
        """One optimizer step on `step`: a batch, or the list of the step's micro-batches.

        The loss is the sum over the step's units on every micro-batch and device divided by
        their total N (transformers' `num_items_in_batch`), so splitting a step over micro-batches
        or devices leaves it unchanged. Each micro-batch backpropagates sum_i * W / N on each of W
        devices, as DDP averages gradients over devices; gradients are synchronised once, on the
        last micro-batch's backward pass. Logs `train/loss`, the step's N-weighted mean (the same
        kind of mean as `val/loss`), and returns it.
        """
        t0 = time.perf_counter()
        batches = step if isinstance(step, list) else [step]
        strategy, world = self.trainer.strategy, self.trainer.world_size
        # Counts stay on the device: no host read here (the one per step is `finite_step`'s).
        local = torch.stack(
            [
                sum(torch.as_tensor(self.loss_count(b), device=self.device) for b in batches),
                sum(b["attention_mask"].sum() for b in batches),  # non-padding tokens
            ]
        )
        # N and the tokens over all devices, in one all-reduce (one device: the same tensor)
        total, tokens = strategy.reduce(local, reduce_op="sum").unbind()
        per_device = total.clamp(min=1) / world
        no_sync = getattr(strategy.model, "no_sync", None)  # DDP / FSDP: skip the gradient sync
        summed = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = self.summed_loss(batch)
                self.manual_backward(loss / per_device)
            summed += loss.detach()
        if not self._grads_checked:
            self._grads_checked = True
            self.check_unused_parameters()
        mean = strategy.reduce(summed, reduce_op="sum") / total.clamp(min=1)  # equal on every rank
        optimizer = self.optimizers()
        if self.finite_step(mean, batches):
            optimizer.step()  # clips first: on_before_optimizer_step
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        optimizer.zero_grad()
        self.log("train/loss", mean, prog_bar=True, batch_size=1)  # Lightning reads it when logging

        seconds = time.perf_counter() - t0
        self._tokens = tokens + (self._tokens if self._tokens is not None else 0)  # all devices
        self.train_time += seconds
        self.log("perf/tokens_per_s", tokens / seconds, prog_bar=True, batch_size=1)
        return mean

    @property
    def train_tokens(self) -> int:
        """Non-padding tokens trained on, over all devices and (after a resume) the whole run;
        read from the device only when asked (logging, checkpoints, metrics.json)."""
        return self._tokens_before + (int(self._tokens) if self._tokens is not None else 0)

    @train_tokens.setter
    def train_tokens(self, value: int) -> None:
        self._tokens_before, self._tokens = int(value), None

    def finite_step(self, mean: torch.Tensor, batches: list[dict]) -> bool:
        """Whether the step's loss (`mean`, reduced over the ranks) and gradient norm (synchronised
        by DDP) are finite, so that every rank decides alike. A non-finite step is skipped (no
        update) and counted while `skip_nonfinite_batches` allows; after that the run stops
        naming the step, its examples and the last good checkpoint.

        Raises:
            faults.NonFiniteError: one more non-finite step than `skip_nonfinite_batches`.
        """
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if str(self.trainer.precision).startswith("16"):  # GradScaler skips inf gradients itself
            norm = torch.zeros(())
        if bool(torch.isfinite(mean) & torch.isfinite(norm.to(mean.device))):
            return True
        self.skipped_nonfinite += 1
        indices = [int(i) for b in batches for i in b.get("example_index", [])]
        last = self._last_checkpoint_path()
        message = faults.nonfinite_report(
            self.trainer.global_step,
            indices,
            float(mean),
            float(norm),
            (last, self._saved_at_step) if last and self._saved_at_step >= 0 else None,
            self.skipped_nonfinite,
            self.skip_nonfinite_batches,
        )
        if self.skipped_nonfinite > self.skip_nonfinite_batches:
            raise faults.NonFiniteError(message)
        warnings.warn(f"Skipped: {message}", stacklevel=1)
        return False

    def check_unused_parameters(self) -> None:
        """After the first step's backward pass: trainable parameters without a gradient belong to
        layers whose output never reaches the loss (a LoRA target the forward pass skips).

        One device: a warning (they stay at their initial values). DDP without
        `find_unused_parameters`: an error here, on every rank alike, instead of DDP's own error
        one step later ("Expected to have finished reduction in the prior iteration").

        Raises:
            ValueError: under DDP with `find_unused_parameters=False`, naming the parameters and
                the config key that allows them.
        """
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if not unused:
            return
        names = f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} ({len(unused)})"
        ddp = self.trainer.strategy.model
        if getattr(ddp, "find_unused_parameters", True) is False and self.trainer.world_size > 1:
            raise ValueError(
                f"These trainable parameters got no gradient in the first step: {names}. Their "
                "layers' output never reaches the loss, and DDP without find_unused_parameters "
                "would fail on them. Leave those modules out of lora.target_modules (or "
                "lora.exclude_modules), or set trainer.strategy.find_unused_parameters=true "
                "(slower: DDP then searches the graph every step)."
            )
        warnings.warn(
            f"Trainable parameters with no gradient (their output never reaches the loss; they "
            f"stay untrained): {names}. Check lora.target_modules.",
            stacklevel=1,
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Here, not in training_step: with float16 mixed precision the gradients are unscaled
        # by now, as Lightning's own clipping has them.
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        # Named groups (lora_A, lora_B, ...): LoRA+ sets B's rate, LearningRateMonitor logs each.
        optimizer = self.optimizer_factory(param_groups(self.model))
        if self.scheduler_factory is None:
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if not 1 <= steps < float("inf"):  # a streamed data set has no length
            raise ValueError(
                "The learning-rate schedule needs a known number of steps: set trainer.max_steps "
                "(required with data.streaming=true), or scheduler=null."
            )
        scheduler = self.scheduler_factory(optimizer=optimizer, num_training_steps=int(steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints: trainable tensors only; last.ckpt at the step where training stopped --------

    def _last_checkpoint_path(self) -> str | None:
        """Where a `save_last` checkpoint callback writes last.ckpt; None without one."""
        if self.trainer.fast_dev_run:  # Lightning saves no checkpoints then
            return None
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", False) and callback.dirpath:
                return callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The step where training stops (max_steps, or a callback's stop such as max_time): save
        # last.ckpt here, with the loops inside the epoch. Lightning's own save at the end of fit
        # comes after it has marked the epoch finished, and a run resumed from that checkpoint
        # would skip the rest of the epoch.
        trainer, path = self.trainer, self._last_checkpoint_path()
        stop_signal = self.signals.requested(trainer)  # Ctrl-C or SIGTERM during this step
        if path and (
            stop_signal or trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        ):
            self._saving_stop = not stop_signal
            trainer.save_checkpoint(path)
        if stop_signal:
            raise faults.RunInterrupted(stop_signal, trainer.global_step, path)

    def teardown(self, stage: str) -> None:
        self.signals.stop()  # also after an exception: Ctrl-C ends the process again

    def on_train_end(self) -> None:
        self.signals.stop()
        # Runs after the callbacks' on_train_end, where ModelCheckpoint may have overwritten the
        # stop step's last.ckpt, or left a stale one (it saves at the end only if it saved nothing
        # earlier in the fit, e.g. with every_n_train_steps).
        path = self._last_checkpoint_path()
        if path is None:
            return
        if self._stop_checkpoint is not None:
            self.trainer.strategy.save_checkpoint(self._stop_checkpoint, path)
            self.trainer.strategy.barrier("last.ckpt")
            self._stop_checkpoint = None
        elif self._saved_at_step != self.trainer.global_step:
            self.trainer.save_checkpoint(path)

    def trainable_names(self) -> set[str]:
        """State-dict keys of the trainable parameters, as Lightning names them (`model.` + the
        parameter's name; FSDP's wrapper names removed, as its full state dict has them)."""
        return {
            "model." + n.replace(FSDP_PREFIX, "")
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is reloaded from its own files; keeping it out makes a checkpoint of the
        # SmolLM2 default ~10 MB instead of ~540 MB.
        # The strategy built `state_dict` (under FSDP: gathered whole on rank 0); keep its
        # trainable part.
        names = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["lorafit"] = {
            "train_tokens": self.train_tokens,
            "train_time": self.train_time,
            "skipped_nonfinite": self.skipped_nonfinite,
            "rng": faults.rng_state(),  # rank 0's: dropout goes on as if never stopped
        }
        loader = self.trainer.train_dataloader
        if callable(getattr(loader, "state_dict", None)):  # lorafit.data.sampling.StepLoader
            checkpoint["lorafit"]["train_loader"] = loader.state_dict()
        self._saved_at_step = self.trainer.global_step
        if self._saving_stop:  # kept, for on_train_end
            self._stop_checkpoint, self._saving_stop = checkpoint, False

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = self.trainable_names()
        missing = sorted(expected - set(checkpoint["state_dict"]))
        unexpected = sorted(set(checkpoint["state_dict"]) - expected)
        if missing or unexpected:
            raise ValueError(
                "Checkpoint does not fit this model's LoRA layers: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}. "
                "Resume with the same model and lora config the checkpoint was trained with."
            )
        totals = checkpoint.get("lorafit", {})
        self.train_tokens = totals.get("train_tokens", 0)
        self.train_time = totals.get("train_time", 0.0)
        self._train_loader_state = totals.get("train_loader")
        self.skipped_nonfinite = totals.get("skipped_nonfinite", 0)
        self._rng_state = totals.get("rng")

    def on_validation_end(self) -> None:
        # The metrics of a validation inside fit, with the step it ran at: `lorafit.train` reuses
        # them as the after-training metrics when that step is the last one.
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k[:4] == "val/"}
            self.last_fit_validation = (trainer.global_step, metrics)

    def on_train_start(self) -> None:
        # The train loader's position (epoch, steps done) goes back in here, before its first
        # batch. Lightning saves it too (the fit loop's `combined_loader`) but loads it only into
        # a loader built after the checkpoint is read, and a schedule sized by
        # `estimated_stepping_batches` builds the loader before that.
        self.signals.start()
        if self._rng_state is not None:  # after Lightning's own seeding and setup
            faults.set_rng_state(self._rng_state)
            self._rng_state = None
        loader, state = self.trainer.train_dataloader, self._train_loader_state
        if state is not None and callable(getattr(loader, "load_state_dict", None)):
            loader.load_state_dict(state)
        self._train_loader_state = None
