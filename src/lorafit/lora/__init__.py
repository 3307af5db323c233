"""LoRA: a frozen layer plus a trainable low-rank update (Hu et al. 2021).

``y = W x + (B A x) * scaling`` with ``A: (r, in)``, ``B: (out, r)``. Everything here
(injection, trainability, state dict, parameter counts, merging) is one walk over the LoRA layers
of :mod:`lorafit.lora.layers` (:class:`LoRALinear` on Linear and Conv1D, with DoRA;
:class:`LoRAEmbedding`). Which layers are targets is :mod:`lorafit.lora.targets`, the
initialisations (PiSSA, OLoRA) :mod:`lorafit.lora.init`, optimizer groups and LoRA+
:mod:`lorafit.lora.loraplus`; their public names are re-exported here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from lorafit.lora.init import BASE_CHANGING, INITS, check_init, converted_lora, init_lora
from lorafit.lora.layers import (
    LORA_LAYERS,
    LoRAEmbedding,
    LoRALinear,
    dense_weight,
    is_conv1d,
    is_quantized,
    make_lora_layer,
)
from lorafit.lora.loraplus import loraplus_adamw, param_groups
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

__all__ = [  # with the names of lorafit.lora.{layers,init,loraplus,targets}, re-exported here
    "LoRAConfig",
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
    "LORA_LAYERS",
    "LoRAEmbedding",
    "LoRALinear",
    "dense_weight",
    "is_conv1d",
    "is_quantized",
    "make_lora_layer",
    "BASE_CHANGING",
    "INITS",
    "check_init",
    "converted_lora",
    "init_lora",
    "loraplus_adamw",
    "param_groups",
]

logger = logging.getLogger(__name__)


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
    use_dora: bool = False,
    init: str = "default",
) -> LoRAReport:
    """Freeze ``model`` and wrap the targeted layers: ``nn.Linear`` and transformers' ``Conv1D``
    in :class:`LoRALinear`, ``nn.Embedding`` (named explicitly) in :class:`LoRAEmbedding`.

    Args:
        model: Any module; works on the meta device (``init`` default or gaussian only).
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
        use_dora: DoRA on the linear targets (PEFT's ``use_dora``).
        init: ``default``, ``gaussian``, ``pissa`` (``pissa_niter_N``) or ``olora``; see
            :mod:`lorafit.lora.init`. PiSSA and OLoRA change the base weights.

    Returns:
        A :class:`LoRAReport` of the wrapped modules and parameter counts.

    Raises:
        ValueError: Bad hyperparameters, a target that matches nothing, LoRA already injected, a
            tied output head targeted without ``untie_embeddings``, or an init or DoRA that the
            target cannot take (see :func:`~lorafit.lora.init.init_lora`).
    """
    _check_hparams(r, lora_alpha, lora_dropout)
    for key, flag in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if not isinstance(flag, bool):  # a string "false" would switch the option on
            raise ValueError(f"lora.{key} must be true or false, got {flag!r}.")
    check_init(init)
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
        # Follow the wrapped layer's mode: a model loaded for inference (eval) must not get
        # LoRA dropout switched on by injection.
        lora = make_lora_layer(base, r_n, alpha_n, lora_dropout, use_rslora, use_dora)
        lora.train(base.training)
        if r_n > min(lora.in_features, lora.out_features):
            too_big.append(f"{name} ({lora.in_features}->{lora.out_features})")
        init_lora(lora, init)
        parent, _, child = name.rpartition(".")
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
    ones (`init` is its `init_lora_weights`, `untie_word_embeddings` lorafit's); see
    :func:`inject_lora`.

    Raises:
        ValueError: `rank_pattern` / `alpha_pattern` that are not mappings.
    """

    r: int | None = 8
    lora_alpha: float | None = 16
    lora_dropout: float = 0.0
    target_modules: Targets | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    exclude_modules: Targets | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    untie_word_embeddings: bool = False
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):  # the default, as the list a config gives
            self.target_modules = list(self.target_modules)
        for key in ("rank_pattern", "alpha_pattern"):  # `+lora.rank_pattern.v_proj=16` etc.
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    f"lora.{key} must be a mapping {{regex suffix: value}}, got {value!r}; e.g. "
                    f"lora.{key}='{{v_proj: 16}}' or +lora.{key}.v_proj=16."
                )

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


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """Yield ``(name, module)`` for every LoRA layer in ``model``: the one walk."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYERS):
            yield name, module


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield every ``lora_A``, ``lora_B`` and DoRA ``lora_magnitude_vector`` parameter."""
    for _, m in lora_modules(model):
        yield from (m.lora_A, m.lora_B)
        if m.use_dora:
            yield m.lora_magnitude_vector


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}`` and, with DoRA,
    ``"<module>.lora_magnitude_vector": (out,)``; detached, not copied."""
    state = {}
    for name, m in lora_modules(model):
        state[f"{name}.lora_A"] = m.lora_A.detach()
        state[f"{name}.lora_B"] = m.lora_B.detach()
        if m.use_dora:
            state[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return state


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (meta tensors count by numel)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_report(model: nn.Module) -> LoRAReport:
    """Describe the LoRA layers of ``model`` and its parameter counts."""
    modules = [  # the layer's own parameters: A, B and DoRA's magnitude
        (n, m.in_features, m.out_features, sum(p.numel() for p in m.parameters(recurse=False)))
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
    """Replace each LoRA layer by its ``base_layer``, merged first unless ``merge=False``.

    The result is a plain model again, so ``save_pretrained`` writes the original key names. A
    disabled layer is dropped unmerged, so the result computes what the model computed before.
    Each merge works on one weight in place: the model never exists twice. A PiSSA/OLoRA layer
    dropped unmerged leaves its residual base weight (not the original one).

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
