"""Causal-LM fine-tuning: next-token cross-entropy on the supervised (assistant) tokens.

The loss never builds whole `(B, T, V)` logits: the decoder runs to hidden states and the output
head scores only the supervised positions, `logits_chunk` rows at a time (`lorafit.tasks.lm_loss`).
"""

from __future__ import annotations

import torch

from lorafit.data.packing import model_inputs
from lorafit.tasks.base import LoRAModule
from lorafit.tasks.lm_loss import causal_lm_loss, supervised_loss, supervised_tokens

__all__ = ["CausalLMModule", "causal_lm_loss", "model_inputs", "supervised_tokens"]


class CausalLMModule(LoRAModule):
    """A causal LM (`AutoModelForCausalLM`) trained on next-token cross-entropy: each optimizer
    step on the mean over all its supervised tokens; `val/loss` is the mean over every supervised
    validation token (weighted by each batch's token count).

    Args:
        logits_chunk: rows of output-head scores computed at once (default 256: at most
            `(256, V)` float32 scores exist, 50 MB at V = 49,152); null or 0: whole `(B, T, V)`
            logits, as `model(...).logits` (more memory; the path before this switch existed).
        **kwargs: `LoRAModule`'s.
    """

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    loss_label = "loss per supervised token (nats)"
    loss_unit = "supervised tokens"

    def __init__(self, *args, logits_chunk: int | None = 256, **kwargs):
        super().__init__(*args, **kwargs)
        if logits_chunk is not None and (not isinstance(logits_chunk, int) or logits_chunk < 0):
            raise ValueError(
                f"task.logits_chunk={logits_chunk}: give a whole number of rows (e.g. 256), or "
                "null for whole logits."
            )
        self.logits_chunk = logits_chunk

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return supervised_loss(self.model, model_inputs(batch), batch["labels"], self.logits_chunk)

    @staticmethod
    def loss_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return supervised_tokens(batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = supervised_tokens(batch["labels"])
        summed = self.summed_loss(batch)
        self.val_loss.update(summed / n.clamp(min=1), weight=n)

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", value, prog_bar=True, sync_dist=True)  # equal on every rank
