"""Several named LoRA adapters on one base model: load, switch, disable, combine with weights.

:class:`AdapterSet` keeps each adapter's tensors; activating one points every
:class:`~lorafit.lora.LoRALinear` at that adapter's ``lora_A``/``lora_B`` (no copy) and switches off
the layers it does not adapt. :meth:`AdapterSet.add_weighted` follows PEFT's
``LoraModel.add_weighted_adapter`` for ``combination_type`` ``"linear"`` and ``"cat"`` (peft 0.21,
``tuners/lora/model.py``):

- ``linear`` (same rank): ``A = sum_i sign_i sqrt(|w_i s_i|) A_i``,
  ``B = sum_i sqrt(|w_i s_i|) B_i``; cheap but not exact (cross terms ``B_i A_j``), as PEFT warns.
- ``cat`` (any ranks): ``A = cat_i(w_i s_i A_i)`` on the rank axis, ``B = cat_i(B_i)``; exact:
  ``B A = sum_i w_i s_i B_i A_i``.

The new adapter has ``lora_alpha = r`` (scaling 1), as PEFT's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorafit.adapters import load_adapter, read_adapter_config, save_adapter
from lorafit.lora import disable_lora, lora_modules, make_lora_layer, unwrap_lora

COMBINATIONS = ("linear", "cat")


@dataclass
class LoRAWeights:
    """One adapter's tensors for one layer: ``lora_A (r, in)``, ``lora_B (out, r)``."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_alpha: float
    scaling: float

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


class AdapterSet:
    """Named LoRA adapters sharing one frozen base model, one of them active.

    Args:
        model: A base model without LoRA layers; changed in place.

    Raises:
        ValueError: ``model`` already has LoRA layers.
    """

    def __init__(self, model: nn.Module) -> None:
        if next(lora_modules(model), None) is not None:
            raise ValueError("AdapterSet needs a base model without LoRA layers.")
        self.model = model
        self.adapters: dict[str, dict[str, LoRAWeights]] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.active: str | None = None

    def load(
        self, name: str, adapter_dir: str | os.PathLike, untie_embeddings: bool = False
    ) -> dict[str, Any]:
        """Load a PEFT/lorafit adapter folder as ``name``; the first one loaded becomes active.

        All checks of :func:`lorafit.adapters.load_adapter` apply (shapes against the base, a
        tied output head only with ``untie_embeddings``).

        Raises:
            ValueError: ``name`` is taken, the model is merged, or the folder does not fit.
            NotImplementedError: The adapter has ``modules_to_save`` (whole modules cannot be
                switched per adapter here; load it alone with ``load_adapter``) or is a DoRA
                adapter (its magnitude is not switched or combined here).
        """
        if name in self.adapters:
            raise ValueError(f"An adapter named {name!r} is already loaded; choose another name.")
        config = read_adapter_config(adapter_dir)
        if config.get("modules_to_save"):
            raise NotImplementedError(
                f"{adapter_dir}: modules_to_save={config['modules_to_save']!r}; AdapterSet "
                "switches LoRA layers only. Load this adapter alone with load_adapter()."
            )
        if config.get("use_dora"):
            raise NotImplementedError(
                f"{adapter_dir}: use_dora=true; AdapterSet switches and combines plain LoRA "
                "adapters only. Load this adapter alone with load_adapter()."
            )
        self._check_unmerged()
        unwrap_lora(self.model, merge=False)  # plain again: load_adapter checks against the base
        try:
            load_adapter(self.model, adapter_dir, untie_embeddings=untie_embeddings)
            self.adapters[name] = {
                n: LoRAWeights(m.lora_A, m.lora_B, m.lora_alpha, m.scaling)
                for n, m in lora_modules(self.model)
            }
            self.configs[name] = config
        finally:  # success or not, the model runs the active adapter again
            unwrap_lora(self.model, merge=False)
            self._wrap()
            if self.adapters:
                self.set_active(self.active or name)
        return config

    def set_active(self, name: str) -> None:
        """Make ``name`` the adapter the model runs; layers it does not adapt run the base alone.

        Raises:
            KeyError: No adapter of that name.
            ValueError: The LoRA layers are merged (unmerge first).
        """
        if name not in self.adapters:
            raise KeyError(f"No adapter named {name!r}; loaded: {sorted(self.adapters)}.")
        self._check_unmerged()
        weights = self.adapters[name]
        for n, m in lora_modules(self.model):
            w = weights.get(n)
            m.disabled = w is None
            if w is not None:
                m.lora_A, m.lora_B = w.lora_A, w.lora_B
                m.r, m.lora_alpha, m.scaling = w.r, w.lora_alpha, w.scaling
        self.active = name

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (PEFT's ``disable_adapter()``)."""
        with disable_lora(self.model):
            yield

    def add_weighted(
        self,
        name: str,
        adapters: Sequence[str],
        weights: Sequence[float],
        combination: str | None = None,
    ) -> str:
        """Add adapter ``name`` = weighted combination of ``adapters`` (see the module docstring).

        Args:
            name: Name of the new adapter.
            adapters: Names of loaded adapters.
            weights: One weight per adapter (may be negative).
            combination: ``"linear"`` (same rank on every layer), ``"cat"``, or ``None``: linear
                when all ranks agree, else cat.

        Returns:
            The combination used.

        Raises:
            ValueError: Unknown names, weights of the wrong length, or linear with unequal ranks.
        """
        if name in self.adapters:
            raise ValueError(f"An adapter named {name!r} is already loaded; choose another name.")
        unknown = [a for a in adapters if a not in self.adapters]
        if unknown or not adapters:
            raise ValueError(f"Unknown adapters {unknown}; loaded: {sorted(self.adapters)}.")
        if len(weights) != len(adapters):
            raise ValueError(f"--weights: {len(weights)} weights for {len(adapters)} adapters.")
        ranks = {w.r for a in adapters for w in self.adapters[a].values()}
        combination = combination or ("linear" if len(ranks) == 1 else "cat")
        if combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}.")
        if combination == "linear" and len(ranks) > 1:
            raise ValueError(
                f"combination 'linear' needs adapters of one rank, found ranks {sorted(ranks)}; "
                "use 'cat' (concatenates the ranks, exact)."
            )
        combined = {}
        for module, _ in lora_modules(self.model):
            parts = [
                (self.adapters[a].get(module), w) for a, w in zip(adapters, weights, strict=True)
            ]
            parts = [(lw, w) for lw, w in parts if lw is not None]
            if parts:
                A, B = _combine(parts, combination)
                combined[module] = LoRAWeights(
                    nn.Parameter(A, requires_grad=False), nn.Parameter(B, requires_grad=False),
                    lora_alpha=A.shape[0], scaling=1.0,
                )  # fmt: skip
        self.adapters[name] = combined
        first = self.configs[adapters[0]]
        r = max(w.r for w in combined.values())
        self.configs[name] = {**first, "r": r, "lora_alpha": r, "use_rslora": False}
        return combination

    def save(self, name: str, out_dir: str | os.PathLike, **extra: Any) -> Path:
        """Write adapter ``name`` as a PEFT adapter folder (per-layer ranks as ``rank_pattern``)."""
        self.set_active(name)
        config = self.configs[name]
        off = [(n, m) for n, m in lora_modules(self.model) if m.disabled]
        for n, m in off:  # hide other adapters' layers from save_adapter
            _replace(self.model, n, m.base_layer)
        try:
            return save_adapter(
                self.model,
                out_dir,
                r=config["r"],
                lora_alpha=config["lora_alpha"],
                lora_dropout=0.0,
                target_modules=list(self.adapters[name]),
                use_rslora=config.get("use_rslora", False),
                base_model_name_or_path=config.get("base_model_name_or_path"),
                task_type=config.get("task_type") or "CAUSAL_LM",
                extra=extra,
            )
        finally:
            for n, m in off:
                _replace(self.model, n, m)

    def _wrap(self) -> None:
        """Wrap every layer some adapter adapts (placeholders until :meth:`set_active`)."""
        names = dict.fromkeys(n for w in self.adapters.values() for n in w)
        for n in names:
            _replace(self.model, n, make_lora_layer(self.model.get_submodule(n), r=1, lora_alpha=1))

    def _check_unmerged(self) -> None:
        if any(m.merged for _, m in lora_modules(self.model)):
            raise ValueError("The LoRA layers are merged; call unmerge_lora(model) first.")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def _combine(parts: list[tuple[LoRAWeights, float]], combination: str) -> tuple[Tensor, Tensor]:
    """PEFT's linear/cat formulas for one layer. Returns ``A (r', in)``, ``B (out, r')``."""
    if combination == "cat":
        A = torch.cat([w * lw.scaling * lw.lora_A for lw, w in parts], dim=0)
        B = torch.cat([lw.lora_B for lw, _ in parts], dim=1)
        return A, B
    A = sum(math.copysign(math.sqrt(abs(w * lw.scaling)), w * lw.scaling) * lw.lora_A
            for lw, w in parts)  # fmt: skip
    B = sum(math.sqrt(abs(w * lw.scaling)) * lw.lora_B for lw, w in parts)
    return A, B
