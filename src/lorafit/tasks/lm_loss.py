"""Causal-LM loss without whole logits: the decoder runs to hidden states, and the output head is
applied only at the positions whose next token is supervised, `chunk` rows at a time.

A chat example's prompt needs no logits, and the `(B, T, V)` logits of a 49k-vocabulary model are
most of a training step's memory (8 x 256 x 49,152 floats = 403 MB in float32, with as much again
for their gradient). Here no more than `(chunk, V)` scores exist at once:

- a frozen head (the default: LoRA leaves `lm_head` alone) goes through
  :class:`FrozenHeadCrossEntropy`, which computes each chunk's loss and its gradient with respect
  to the hidden states in one pass (`softmax - onehot` times the head's weight), so backward has
  nothing to recompute (the idea of fused linear cross-entropy kernels, e.g. Liger-Kernel's);
- a trainable head (LoRA on `lm_head`, a full fine-tune) runs each chunk under activation
  checkpointing (`torch.utils.checkpoint`), recomputing the chunk's scores in backward.

The result equals `F.cross_entropy` over the same rows of the full logits (float32: to rounding;
tests/tasks/test_lm_loss.py). Models whose logits are not `head(hidden)` (a final soft-capping or
logit scale after the head, as Gemma 2 or Cohere) are found by `split_head` and take the full
logits path instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lorafit.data.encoding import IGNORE_INDEX

log = logging.getLogger(__name__)

# config keys of transformers models that change the logits after the output head
POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def supervised_tokens(labels: Tensor) -> Tensor:
    """How many positions of (B, T) `labels` are next-token targets (labelled, and not the first
    position: nothing predicts it), as a 0-dim long tensor on `labels`' device (no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> tuple[Tensor, int]:
    """Next-token cross-entropy over labelled positions, from whole logits.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) target ids, `IGNORE_INDEX` (-100) where no loss is taken.
        reduction: `mean` (per supervised token) or `sum` (over the supervised tokens).

    Returns:
        (loss in nats, number of supervised tokens N).

    Only the N labelled rows are upcast to float32 ((N, V), not (B, T, V)).
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    keep = shift_labels != IGNORE_INDEX
    n = int(keep.sum())
    picked = logits[:, :-1][keep].float()  # (N, V)
    loss = F.cross_entropy(picked, shift_labels[keep], reduction="sum")
    return (loss if reduction == "sum" else loss / max(n, 1)), n


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunk by chunk,
    for a head whose weight gets no gradient.

    Forward, per chunk of rows: scores `(c, V)` in the matmul's dtype (bf16 under autocast, as the
    head's own forward), upcast to float32, `logsumexp - score[target]` summed; then the scores
    become `softmax - onehot` in place and `d loss / d hidden = (softmax - onehot) @ weight` is
    stored, `(N, H)`. Backward scales it by the incoming gradient. Peak extra memory: one chunk's
    scores; saved for backward: `(N, H)`.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk: int) -> Tensor:  # fmt: skip
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)  # (N, H)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            scores = F.linear(h, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(scores, dim=-1)  # (c,)
            total += (lse - scores.gather(1, t[:, None]).squeeze(1)).sum()
            probs = scores.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            grad[i : i + chunk] = F.linear(probs.to(weight.dtype), weight.T).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def head_loss(hidden: Tensor, head: nn.Module, targets: Tensor, chunk: int) -> Tensor:
    """Summed next-token cross-entropy (nats, float32 0-dim) of `head` applied to `hidden`.

    Args:
        hidden: (N, H) hidden states at the supervised positions.
        head: the output head (`nn.Linear`, or a LoRA layer around one), `(N, H) -> (N, V)`.
        targets: (N,) next-token ids.
        chunk: rows scored at once.
    """
    weight = getattr(head, "weight", None)
    trainable = any(p.requires_grad for p in head.parameters())
    if not torch.is_grad_enabled() or not hidden.requires_grad:  # evaluation: no gradient kept
        return sum(
            (
                F.cross_entropy(
                    head(hidden[i : i + chunk]).float(), targets[i : i + chunk], reduction="sum"
                )  # fmt: skip
                for i in range(0, hidden.shape[0], chunk)
            ),
            torch.zeros((), device=hidden.device),
        )
    if isinstance(head, nn.Linear) and not trainable and weight.dim() == 2:  # not ZeRO-3-sharded
        return FrozenHeadCrossEntropy.apply(hidden, weight, head.bias, targets, chunk)

    def chunk_loss(h: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    return sum(
        (
            checkpoint(
                chunk_loss, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False
            )  # fmt: skip
            for i in range(0, hidden.shape[0], chunk)
        ),
        torch.zeros((), device=hidden.device),
    )


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, output head) of a transformers causal LM whose logits are `head(decoder(...)
    .last_hidden_state)`, or None when they are not (a config key of `POST_HEAD_KEYS` set to
    something that changes them, or no decoder/head to get)."""
    config = getattr(model, "config", None)
    for key in POST_HEAD_KEYS:
        if getattr(config, key, None) not in (None, 0, 1, 1.0):
            return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def supervised_loss(
    model: nn.Module, inputs: dict[str, Tensor], labels: Tensor, chunk: int | None
) -> Tensor:
    """Summed next-token cross-entropy (nats) over the supervised positions of a batch.

    Args:
        model: a transformers causal LM (LoRA layers inside or not).
        inputs: the model's keyword inputs (`input_ids` (B, T), `attention_mask`, and for packed
            rows `position_ids`).
        labels: (B, T) target ids, -100 where no loss is taken.
        chunk: rows of logits scored at once; None or 0: whole `(B, T, V)` logits, as the model's
            own forward (the slower, larger path, kept for comparison and for models
            `split_head` refuses).
    """
    parts = split_head(model) if chunk else None
    if parts is None:
        return causal_lm_loss(model(**inputs).logits, labels, reduction="sum")[0]
    decoder, head = parts
    hidden = decoder(**{**inputs, "use_cache": False}).last_hidden_state  # (B, T, H)
    shift = labels[:, 1:]
    keep = shift != IGNORE_INDEX  # (B, T-1): positions whose next token is a target
    return head_loss(hidden[:, :-1][keep], head, shift[keep], chunk)
