"""Optimizer parameter groups of a LoRA model, and LoRA+ (Hayou et al. 2024).

:func:`param_groups` splits the trainable parameters into named groups (``lora_A``, ``lora_B``,
``lora_magnitude`` for DoRA, ``other`` for heads or full fine-tuning): any torch optimizer takes
them with one learning rate, and Lightning's ``LearningRateMonitor`` logs one curve per group
(``lr-AdamW/lora_A``, ...). LoRA+ (:func:`loraplus_adamw`, ``optimizer=loraplus``) gives the
``lora_B`` group ``loraplus_lr_ratio`` times the learning rate of the others, as PEFT's
``create_loraplus_optimizer`` (PEFT also gives embeddings their own rate; lorafit treats an
embedding's A and B like a linear layer's).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lorafit.lora.layers import LORA_LAYERS


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as named optimizer groups (empty groups left out).

    Returns:
        ``[{"name": "lora_A", "params": [...]}, {"name": "lora_B", ...}, ...]``; every
        parameter that requires grad is in exactly one group.
    """
    role: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, LORA_LAYERS):
            role[id(m.lora_A)], role[id(m.lora_B)] = "lora_A", "lora_B"
            if getattr(m, "use_dora", False):
                role[id(m.lora_magnitude_vector)] = "lora_magnitude"
    groups: dict[str, list[nn.Parameter]] = {
        "lora_A": [], "lora_B": [], "lora_magnitude": [], "other": []
    }  # fmt: skip
    for p in model.parameters():
        if p.requires_grad:
            groups[role.get(id(p), "other")].append(p)
    return [{"name": n, "params": ps} for n, ps in groups.items() if ps]


def loraplus_adamw(
    params: Iterable[dict[str, Any]],
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    **adamw_kwargs: Any,
) -> torch.optim.AdamW:
    """AdamW with LoRA+'s learning rates: ``lora_B`` at ``lr * loraplus_lr_ratio``, the rest
    at ``lr`` (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models").

    Args:
        params: The groups of :func:`param_groups` (what the task module passes).
        lr: Learning rate of A (and of the magnitude and heads).
        loraplus_lr_ratio: B's learning rate over A's, > 0 (the paper suggests 2^4 = 16).
        adamw_kwargs: ``weight_decay``, ``betas``, ... for ``torch.optim.AdamW``.

    Raises:
        ValueError: ``params`` are not named groups, there is no ``lora_B`` group (``lora=none``),
            or the ratio is not a number > 0.
    """
    ratio = loraplus_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
        raise ValueError(
            f"optimizer.loraplus_lr_ratio must be a number > 0 (B's learning rate over A's), "
            f"got {ratio!r}."
        )
    groups = list(params)
    if not all(isinstance(g, dict) and "name" in g for g in groups):
        raise ValueError(
            "optimizer=loraplus needs the named parameter groups of lorafit.lora.param_groups "
            "(model), not a flat list of parameters."
        )
    if not any(g["name"] == "lora_B" for g in groups):
        raise ValueError(
            "optimizer=loraplus: the model has no LoRA layers (lora=none?), so there is no B "
            "matrix to speed up; use optimizer=adamw."
        )
    groups = [{**g, "lr": lr * ratio if g["name"] == "lora_B" else lr} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, **adamw_kwargs)
