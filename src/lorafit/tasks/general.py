"""Forgetting, measured: the causal-LM loss of the model on text outside its task, before and after
training (`general_loss_before` / `general_loss_after` in metrics.json).

A fine-tuned model can get better at its task and worse at everything else; Biderman et al. 2024
("LoRA Learns Less and Forgets Less") measure that as the loss on text from the pre-training
distribution. The `eval` node of `conf/train.yaml` names the text (`lorafit.data.general`). A plain
`no_grad` loop over a few fixed batches, in the trainer's precision (bf16 autocast when training
uses it, as validation). Every rank of a distributed run computes it (the same batches, so the same
number): a sharded (FSDP) model cannot run a forward pass on one rank alone.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from lorafit.assets import AssetError
from lorafit.data.general import general_batches, general_texts
from lorafit.tasks.lm_loss import supervised_loss, supervised_tokens

log = logging.getLogger(__name__)
LOGITS_CHUNK = 256  # output-head rows scored at once (lorafit.tasks.lm_loss)


class GeneralLoss:
    """The `eval` config node: token-mean causal-LM loss on a fixed sample of general text.

    Args:
        general_text: `bbc_news` (built-in), a local file/folder/glob with a `text` column, or
            None: off.
        general_docs: Documents in the sample (fixed: the same in every run).
        general_max_tokens: The first tokens of each document that are scored.
        batch_size: Documents per forward pass.
        cache_before: Keep the metrics before training (this and `eval_loss`) in lorafit's
            cache, keyed by base model files and data (`lorafit.tasks.evaluation`), so the runs
            of a sweep compute them once; false: always compute.
        task: The run's task name; only `causal_lm` models are scored (a classifier has no
            language-model head).
        tokenizer: The run's tokenizer.

    Raises:
        DataError: Bad values or an unreadable `general_text` (not `bbc_news` without its
            package, which only logs a warning: the measurement is optional).
    """

    def __init__(
        self,
        general_text: str | None = "bbc_news",
        general_docs: int = 200,
        general_max_tokens: int = 128,
        batch_size: int = 16,
        cache_before: bool = True,
        *,
        task: str = "causal_lm",
        tokenizer: Any = None,
    ):
        self.batches: list[dict[str, torch.Tensor]] = []
        self.cache_before = cache_before
        if general_text is None:
            log.info("eval.general_text is null: no general_loss_before/after.")
            return
        if task != "causal_lm":
            log.info("task=%s is not a causal LM: no general_loss_before/after.", task)
            return
        try:
            texts = general_texts(general_text, general_docs)
        except AssetError as e:
            if general_text != "bbc_news":
                raise
            log.warning("No general_loss_before/after: %s (eval.general_text=null: off)", e)
            return
        self.batches = general_batches(tokenizer, texts, general_max_tokens, batch_size)
        tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in self.batches)
        log.info(
            "General text (forgetting): %s, %d documents, %d scored tokens.",
            general_text,
            len(texts),
            tokens,
        )

    @torch.no_grad()
    def loss(self, model: nn.Module, context: Any = contextlib.nullcontext) -> float:
        """Mean next-token loss (nats per token) of ``model`` over the batches, in eval mode (each
        module's mode is restored after). ``context`` wraps each forward pass (e.g. autocast)."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        try:
            for batch in self.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                with context():
                    summed = supervised_loss(model, inputs, batch["labels"], LOGITS_CHUNK)
                total += float(summed)
                count += int(supervised_tokens(batch["labels"]))
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return total / max(count, 1)

    def __call__(self, trainer: L.Trainer, model: nn.Module) -> dict[str, float]:
        """``{"general_loss": ...}`` in the trainer's precision; ``{}`` when off."""
        if not self.batches:
            return {}
        return {"general_loss": self.loss(model, trainer.precision_plugin.forward_context)}


def general_loss(node: Any, task: str, tokenizer: Any) -> GeneralLoss:
    """The run's :class:`GeneralLoss` from its `eval` node (built through `_target_`); a config
    without one (a run folder from before it existed) measures nothing."""
    if not node:
        return GeneralLoss(None, task=task, tokenizer=tokenizer)
    return instantiate(node, task=task, tokenizer=tokenizer)
