"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update (Hu et al. 2021).

``y = W x + (B A x) * scaling`` with ``A: (r, in)``, ``B: (out, r)``. Everything else here
(trainability, state dict, parameter counts, merging) is one walk over :class:`LoRALinear` modules.
Which layers are targets (PEFT's matching rules, task heads, tied output heads) is
:mod:`lorafit.lora.targets`; its public names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafit.lora.targets import (
    ALL_LINEAR,
    HEAD_NAMES,
    Targets,
    TiedEmbeddingsError,
    find_targets,
    is_under,
    matches,
    untie_output_head,
)

__all__ = [  # with the names of lorafit.lora.targets, re-exported here
    "LoRAConfig",
    "LoRALinear",
    "LoRAReport",
    "count_params",
    "disable_lora",
    "inject_lora",
    "lora_modules",
    "lora_parameters",
    "lora_report",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "unwrap_lora",
    "ALL_LINEAR",
    "HEAD_NAMES",
    "Targets",
    "TiedEmbeddingsError",
    "find_targets",
    "is_under",
    "matches",
    "untie_output_head",
]

logger = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus the low-rank path ``B @ A``.

    Args:
        base_layer: The Linear layer to adapt, kept as is (PEFT's attribute name, so state-dict
            keys read ``...q_proj.base_layer.weight``).
        r: Rank of the update, >= 1.
        lora_alpha: Numerator of the scaling.
        lora_dropout: Dropout probability on the input of the LoRA path only.
        use_rslora: Scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023, as
            PEFT's ``use_rslora``) instead of ``lora_alpha / r``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, **kw))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform as loralib/PEFT, B zeros: the layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the base layer and, unless merged or disabled, the LoRA path.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Tensor of shape ``(..., out_features)``.
        """
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        # Cast A and B to the input's dtype so float32 adapters work on bf16 activations.
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = F.linear(self.lora_dropout(x), lora_A)  # (..., r)
        return out + F.linear(h, lora_B) * self.scaling  # (..., out_features)

    def delta_weight(self) -> Tensor:
        """Return ``B @ A * scaling`` in float32, shape ``(out_features, in_features)``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into ``base_layer.weight`` (in float32, cast back); warn if merged."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``base_layer.weight``; warn if not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


@dataclass
class LoRAReport:
    """What :func:`inject_lora` did.

    Attributes:
        modules: ``(name, in_features, out_features, lora params)`` per wrapped layer.
        trainable_params: Parameters that require grad after injection.
        total_params: All parameters of the model, LoRA included.
    """

    modules: list[tuple[str, int, int, int]]
    trainable_params: int
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.modules)} modules: {self.trainable_params:,} trainable of "
            f"{self.total_params:,} params ({100 * self.trainable_fraction:.4f}%)"
        )


def _pattern_value(pattern: dict[str, float] | None, name: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first key matching a ``.``-suffix."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_hparams(r: object, lora_alpha: object, lora_dropout: float, key: str = "lora.r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{key} must be an integer >= 1 (the LoRA rank), got {r!r}.")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, int | float) or lora_alpha <= 0:
        raise ValueError(f"lora.lora_alpha must be a number > 0, got {lora_alpha!r}.")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora.lora_dropout must be in [0, 1), got {lora_dropout!r}.")


def inject_lora(
    model: nn.Module,
    target_modules: Targets,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    exclude_modules: Targets | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    untie_embeddings: bool = False,
) -> LoRAReport:
    """Freeze ``model`` and replace the targeted ``nn.Linear`` layers by :class:`LoRALinear`.

    Args:
        model: Any module; works on the meta device.
        target_modules: Names (exact or ``.``-suffix), one regex (full match) or ``"all-linear"``.
        r: Rank, >= 1.
        lora_alpha: Scaling numerator, > 0.
        lora_dropout: Dropout on the LoRA path input.
        use_rslora: Scale by ``alpha / sqrt(r)``.
        exclude_modules: Same forms as ``target_modules``; matches are not wrapped.
        rank_pattern: PEFT's per-module rank overrides ``{regex suffix: r}``.
        alpha_pattern: PEFT's per-module alpha overrides ``{regex suffix: alpha}``.
        modules_to_save: Modules trained whole (a task's new head): no LoRA in or under them.
        untie_embeddings: Let a target be an output head tied to the input embedding (an error
            otherwise) by first giving the head its own weight.

    Returns:
        A :class:`LoRAReport` of the wrapped modules and parameter counts.

    Raises:
        ValueError: Bad hyperparameters, a target that matches nothing, LoRA already injected, or
            a tied output head targeted without ``untie_embeddings``.
    """
    _check_hparams(r, lora_alpha, lora_dropout)
    if not isinstance(use_rslora, bool):  # a string "false" would switch rsLoRA on
        raise ValueError(f"lora.use_rslora must be true or false, got {use_rslora!r}.")
    if next(lora_modules(model), None) is not None:
        raise ValueError(
            f"{type(model).__name__} already has LoRA layers; inject into a fresh model, or call "
            "unwrap_lora(model) first."
        )
    names = find_targets(model, target_modules, exclude_modules, modules_to_save)
    untie_output_head(model, names, untie_embeddings)
    plan = {
        n: (_pattern_value(rank_pattern, n, r), _pattern_value(alpha_pattern, n, lora_alpha))
        for n in names
    }  # name -> (r, lora_alpha) after PEFT's per-module overrides
    for n, (r_n, alpha_n) in plan.items():
        _check_hparams(r_n, alpha_n, lora_dropout, key=f"lora.rank_pattern[{n!r}]")

    model.requires_grad_(False)
    too_big = []
    for name, (r_n, alpha_n) in plan.items():
        base = model.get_submodule(name)
        if r_n > min(base.in_features, base.out_features):
            too_big.append(f"{name} ({base.in_features}->{base.out_features})")
        parent, _, child = name.rpartition(".")
        # Follow the wrapped layer's mode: a model loaded for inference (eval) must not get
        # LoRA dropout switched on by injection.
        lora = LoRALinear(base, r_n, alpha_n, lora_dropout, use_rslora).train(base.training)
        setattr(model.get_submodule(parent), child, lora)
    if too_big:
        logger.warning(
            "lora.r=%d exceeds min(in_features, out_features) of %d layer(s): %s. The update can "
            "be no richer than full rank there; a smaller r trains the same thing with fewer "
            "parameters.",
            r,
            len(too_big),
            ", ".join(too_big),
        )
    return lora_report(model)


@dataclass
class LoRAConfig:
    """The `lora` config group (instantiated from `conf/lora/*.yaml`): `inject_lora`'s arguments.

    The defaults are `conf/lora/default.yaml`'s, so a `lora` file that sets only some fields
    (`r: 4`) means the default LoRA with those changed. `target_modules=None` (`lora=none`) means
    no LoRA: full fine-tuning of every weight. Field names and meanings are PEFT's `LoraConfig`
    ones; see :func:`inject_lora`.
    """

    r: int | None = 8
    lora_alpha: float | None = 16
    lora_dropout: float = 0.05
    target_modules: Targets | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    exclude_modules: Targets | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    untie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):  # the default, as the list a config gives
            self.target_modules = list(self.target_modules)

    @property
    def full_finetune(self) -> bool:
        """True when no layer is targeted: train the whole model instead."""
        return self.target_modules is None

    def inject(self, model: nn.Module, modules_to_save: Sequence[str] | None = None) -> LoRAReport:
        """`inject_lora(model, ...)` with these fields and the task's heads (`modules_to_save`,
        kept free of LoRA). Raises what `inject_lora` raises."""
        fields = dict(vars(self), untie_embeddings=self.untie_word_embeddings)
        del fields["untie_word_embeddings"]
        return inject_lora(model, **fields, modules_to_save=modules_to_save)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, module)`` for every :class:`LoRALinear` in ``model``: the one walk."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield every ``lora_A`` and ``lora_B`` parameter (for the optimizer)."""
    for _, m in lora_modules(model):
        yield from (m.lora_A, m.lora_B)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}``, detached, not copied."""
    state = {}
    for name, m in lora_modules(model):
        state[f"{name}.lora_A"] = m.lora_A.detach()
        state[f"{name}.lora_B"] = m.lora_B.detach()
    return state


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (meta tensors count by numel)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_report(model: nn.Module) -> LoRAReport:
    """Describe the LoRA layers of ``model`` and its parameter counts."""
    modules = [
        (n, m.lora_A.shape[1], m.lora_B.shape[0], m.lora_A.numel() + m.lora_B.numel())
        for n, m in lora_modules(model)
    ]
    trainable, total = count_params(model)
    return LoRAReport(modules=modules, trainable_params=trainable, total_params=total)


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its base weight."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for _, m in lora_modules(model):
        m.unmerge()


def unwrap_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each :class:`LoRALinear` by its ``base_layer``, merged first unless ``merge=False``.

    The result is a plain model again, so ``save_pretrained`` writes the original key names. A
    disabled layer is dropped unmerged, so the result computes what the model computed before.
    Each merge works on one weight in place: the model never exists twice.

    Returns:
        The same ``model``, changed in place.
    """
    for name, m in list(lora_modules(model)):
        if merge and not m.merged and not m.disabled:
            m.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base_layer)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the ``with`` block (e.g. for "before" answers)."""
    saved = [(m, m.disabled) for _, m in lora_modules(model)]
    for m, _ in saved:
        m.disabled = True
    try:
        yield
    finally:
        for m, flag in saved:
            m.disabled = flag
