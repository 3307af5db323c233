"""The LightningModule base every task shares: a transformers model with LoRA layers, its optimizer
and schedule, timing, and checkpoints that hold trainable tensors only.

A task is a subclass (`tasks/causal_lm.py`, `tasks/classification.py`) that adds its loss and
metrics and says, through class attributes, how `lorafit.train` builds and saves it; the `task`
config group names the subclass (`_target_`), so adding a task is one module and one YAML file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from transformers import get_scheduler


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    name: str = "cosine_with_min_lr",
    warmup_ratio: float = 0.0,
    **kwargs: Any,
) -> LRScheduler:
    """transformers' schedule `name` (`get_scheduler`) with the warmup given as a share of steps.

    A ratio follows `trainer.max_steps` / epoch changes, where a fixed count would not (Lightning
    knows the step count only once fitting starts). The learning rate rises linearly from 0 over
    `ceil(warmup_ratio * num_training_steps)` steps (none for 0), then follows `name`:
    `cosine_with_min_lr` (decay to `min_lr_rate` x lr), `constant_with_warmup`, `linear`, ...

    Args:
        kwargs: the schedule's own arguments (`min_lr_rate`, `num_cycles`, ...), passed on as
            transformers' `scheduler_specific_kwargs`.
    """
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(num_training_steps * warmup_ratio),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


class LoRAModule(L.LightningModule):
    """Frozen transformers model + LoRA layers; subclasses add `training_step` and validation.

    Only parameters with `requires_grad` (the LoRA matrices after `inject_lora`, and a task's new
    head) reach the optimizer and the checkpoints; resuming loads them back onto the same base.

    Class attributes (what `lorafit.train` reads before the module exists):
        name: the task's name (`causal_lm`), also the `lorafit.models.AUTO_CLASSES` key.
        peft_task_type: PEFT's `task_type` written in `adapter_config.json`.
        loss_label: y-axis label of `loss_curve.png`.
        heads: last names of new output modules trained fully and saved whole (PEFT's
            `modules_to_save`).

    Args:
        model: a transformers model whose LoRA layers are already injected.
        optimizer: partial optimizer (`_partial_: true` config), called with the trainable params.
        scheduler: partial schedule called with `optimizer` and `num_training_steps`, or None.
    """

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""
    loss_label: ClassVar[str] = "loss"
    heads: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_loss = MeanMetric()  # weighted by what the task's loss averages over
        self.strict_loading = False  # checkpoints hold trainable tensors only; checked below
        # Totals over training batches (forward + backward + optimizer), for metrics.json.
        self.train_tokens, self.train_time = 0, 0.0
        self._t_batch = 0.0

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
        """Extra metrics.json entries after training (test-split metrics, pictures); none here."""
        return {}

    # -- Lightning hooks --------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> the model's logits ((B, T, V) for a causal LM, (B, C) classes)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t_batch
        tokens = int(batch["attention_mask"].sum())  # non-padding tokens
        self.train_tokens += tokens
        self.train_time += seconds
        self.log("perf/tokens_per_s", tokens / seconds, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
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

    # -- checkpoints: trainable tensors only ------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state restricted to trainable parameters (Lightning's key names)."""
        names = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is reloaded from its own files; keeping it out makes a checkpoint of the
        # SmolLM2 default ~10 MB instead of ~540 MB.
        checkpoint["state_dict"] = self.trainable_state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = set(self.trainable_state_dict())
        missing = sorted(expected - set(checkpoint["state_dict"]))
        unexpected = sorted(set(checkpoint["state_dict"]) - expected)
        if missing or unexpected:
            raise ValueError(
                "Checkpoint does not fit this model's LoRA layers: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}. "
                "Resume with the same model and lora config the checkpoint was trained with."
            )
