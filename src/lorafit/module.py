"""The LightningModule: a frozen base model with LoRA layers, its loss, metrics and optimizer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from lorafit.data import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over labelled positions.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) target ids, `IGNORE_INDEX` (-100) where no loss is taken.

    Returns:
        (mean loss per supervised token in nats, number of supervised tokens N).

    Only the N labelled rows are upcast to float32 ((N, V), not (B, T, V)): with a 49k vocabulary
    and answers that are a fraction of each conversation, this is most of the loss's memory.
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    keep = shift_labels != IGNORE_INDEX
    n = int(keep.sum())
    picked = logits[:, :-1][keep].float()  # (N, V)
    loss = F.cross_entropy(picked, shift_labels[keep], reduction="sum")
    return loss / max(n, 1), n


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_lr_ratio` x lr.

    The shape of transformers' `get_cosine_schedule_with_warmup`, with the warmup given as a
    ratio so it follows `trainer.max_steps` / epochs changes.
    """
    warmup = max(1, int(num_training_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant_with_warmup(
    optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup over `warmup_ratio` of the steps, then the constant base learning rate."""
    warmup = max(1, int(num_training_steps * warmup_ratio))
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


class LoRAModule(L.LightningModule):
    """Frozen transformers model + LoRA layers, trained on a causal-LM loss.

    Only parameters with `requires_grad` (the LoRA matrices, after `inject_lora`) reach the
    optimizer and the checkpoints; resuming loads them back onto the same base model.

    Args:
        model: a transformers causal LM whose LoRA layers are already injected.
        optimizer: partial optimizer (`_partial_: true` config), called with the trainable params.
        scheduler: partial scheduler called with `optimizer` and `num_training_steps`, or None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., LambdaLR] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_loss = MeanMetric()  # weighted by supervised tokens: a per-token mean
        self.strict_loading = False  # checkpoints hold trainable tensors only; checked below
        # Totals over training batches (forward + backward + optimizer), for metrics.json.
        self.train_tokens, self.train_time = 0, 0.0
        self.history: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
        self._t_batch = 0.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T, V) logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, _ = causal_lm_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t_batch
        tokens = int(batch["attention_mask"].sum())  # non-padding tokens
        self.train_tokens += tokens
        self.train_time += seconds
        self.history["train"].append((self.global_step, float(outputs["loss"])))
        self.log("perf/tokens_per_s", tokens / seconds, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, n = causal_lm_loss(logits, batch["labels"])
        self.val_loss.update(loss, weight=n)

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", value, prog_bar=True)
        self.history["val"].append((self.global_step, float(value)))

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
