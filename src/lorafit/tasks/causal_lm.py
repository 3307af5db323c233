"""Causal-LM fine-tuning: next-token cross-entropy on the supervised (assistant) tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.encoding import IGNORE_INDEX
from lorafit.tasks.base import LoRAModule


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many positions of (B, T) `labels` are next-token targets: labelled, and not the first
    position (nothing predicts it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over labelled positions.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) target ids, `IGNORE_INDEX` (-100) where no loss is taken.
        reduction: `mean` (per supervised token) or `sum` (over the supervised tokens).

    Returns:
        (loss in nats, number of supervised tokens N).

    Only the N labelled rows are upcast to float32 ((N, V), not (B, T, V)): with a 49k vocabulary
    and answers that are a fraction of each conversation, this is most of the loss's memory.
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    keep = shift_labels != IGNORE_INDEX
    n = int(keep.sum())
    picked = logits[:, :-1][keep].float()  # (N, V)
    loss = F.cross_entropy(picked, shift_labels[keep], reduction="sum")
    return (loss if reduction == "sum" else loss / max(n, 1)), n


class CausalLMModule(LoRAModule):
    """A causal LM (`AutoModelForCausalLM`) trained on `causal_lm_loss`: each optimizer step on
    the mean over all its supervised tokens; `val/loss` is the mean over every supervised
    validation token (weighted by each batch's token count)."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    loss_label = "loss per supervised token (nats)"
    loss_unit = "supervised tokens"

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return causal_lm_loss(logits, batch["labels"], reduction="sum")[0]

    @staticmethod
    def loss_count(batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, n = causal_lm_loss(logits, batch["labels"])
        self.val_loss.update(loss, weight=n)

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", value, prog_bar=True, sync_dist=True)  # equal on every rank
