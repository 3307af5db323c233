"""Save and load LoRA adapters in PEFT's on-disk format.

A folder holds ``adapter_config.json`` (the PEFT ``LoraConfig`` fields that differ from PEFT's
defaults, so PEFT releases back to 0.12 read it; read strictly by :mod:`.peft_config`),
``lorafit.json`` (lorafit's own metadata: config hash, versions, label names; returned
under ``"lorafit"`` by :func:`read_adapter_config`) and ``adapter_model.safetensors``, whose keys
read ``base_model.model.<module>.lora_A.weight`` (``.lora_embedding_A`` for an embedding,
``.lora_magnitude_vector`` for DoRA's magnitude), so ``peft.PeftModel.from_pretrained`` loads it and
:func:`load_adapter` loads folders that PEFT wrote. An adapter trained from a base-changing init
(PiSSA, OLoRA) is saved converted, as PEFT's ``path_initial_model_for_weight_conversion`` does: a
plain LoRA of rank 2r that applies to the original base. Loading, and the faults it names:
:mod:`.loading`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_safetensors
from torch import nn

from lorafit.adapters.loading import (
    PEFT_PREFIX,
    WEIGHTS_NAME,
    load_adapter,
    read_weights,
)
from lorafit.adapters.peft_config import (
    CONFIG_NAME,
    EXTRA_NAME,
    PEFT_DEFAULTS,
    read_adapter_config,
)
from lorafit.lora import (
    ALL_LINEAR,
    BASE_CHANGING,
    LoRAEmbedding,
    LoRALinear,
    converted_lora,
    is_conv1d,
    is_quantized,
    is_under,
    lora_modules,
    matches,
)
from lorafit.runinfo import atomic_write_files

__all__ = [  # with the names of .loading and .peft_config, re-exported here
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "load_adapter",
    "read_weights",
    "save_adapter",
    "CONFIG_NAME",
    "EXTRA_NAME",
    "PEFT_DEFAULTS",
    "read_adapter_config",
]

logger = logging.getLogger(__name__)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: str | Sequence[str],
    use_rslora: bool,
    base_model_name_or_path: str | os.PathLike | None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    tokenizer=None,
) -> Path:
    """Write the LoRA tensors of ``model`` (and ``modules_to_save``) as a PEFT adapter folder.

    Per-module ranks or alphas that differ from ``r``/``lora_alpha`` are written as PEFT's
    ``rank_pattern``/``alpha_pattern``. DoRA layers write ``use_dora``, Conv1D layers
    ``fan_in_fan_out``. Layers initialised by PiSSA/OLoRA are written converted
    (:func:`lorafit.lora.converted_lora`): ``r`` and ``lora_alpha`` doubled (alpha times sqrt(2)
    with rsLoRA, the same scaling), ``init_lora_weights: true``, as PEFT's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)``; ``lorafit.json`` records the init.
    ``"all-linear"`` is written as the full names of the wrapped modules (as PEFT 0.21 itself
    does), so PEFT adapts exactly the same layers; so are
    targets with ``exclude_modules`` (a key PEFT < 0.14 cannot read), targets that also name
    layers inside ``modules_to_save`` (PEFT releases differ there), and targets that do not
    describe the model's LoRA layers (with a warning), e.g. when ``exclude_modules`` was not
    passed. Only fields that differ from PEFT's defaults are written, plus ``peft_type``,
    ``task_type``, ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``.

    Args:
        model: A model with LoRA injected.
        out_dir: Folder to create, or whose adapter files to replace.
        r, lora_alpha, lora_dropout, target_modules, use_rslora, exclude_modules: The LoRA config
            that produced ``model``.
        base_model_name_or_path: Hub id or folder of the base model, for PEFT's config.
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...).
        modules_to_save: Fully trained modules (e.g. a classifier head) saved whole.
        extra: Free-form metadata, written to ``lorafit.json`` beside PEFT's two files.
        tokenizer: Saved into the folder too (``save_pretrained``), in the same atomic write.

    The folder is written with :func:`lorafit.runinfo.atomic_write_files`: a new one appears
    complete or not at all; in an existing one every file is written in full before any replaces
    its old version, so a failed save (disk full, permission) leaves the previous adapter whole.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``model`` has no LoRA layers, or one inside ``modules_to_save``.
        OSError: The write failed (the previous folder left as it was).
    """
    wrapped = dict(lora_modules(model))
    if not wrapped:
        raise ValueError("save_adapter: the model has no LoRA layers; call inject_lora first.")
    heads = list(modules_to_save or [])
    inside = [n for n in wrapped if is_under(n, heads)]
    if inside:
        raise ValueError(
            f"save_adapter: LoRA layer {inside[0]} is inside a module saved whole "
            f"(modules_to_save={heads}); PEFT cannot read that. Inject with "
            "modules_to_save=<the heads> so that heads get no LoRA layers."
        )
    if target_modules != ALL_LINEAR and not _describes(
        model, wrapped, target_modules, exclude_modules, heads
    ):
        logger.warning(
            "save_adapter: target_modules=%r with exclude_modules=%r does not describe the "
            "model's LoRA layers; writing their full names instead so PEFT adapts the same ones.",
            target_modules,
            exclude_modules,
        )
    if target_modules == ALL_LINEAR or not _describes(model, wrapped, target_modules, None, []):
        target_modules = list(wrapped)
    inits = {m.init for m in wrapped.values()} & set(BASE_CHANGING)
    factor = 2 if inits else 1  # the converted adapter's rank and alpha (PEFT's doubling)
    alpha_factor = math.sqrt(2) if inits and use_rslora else factor
    r, alpha = r * factor, lora_alpha * alpha_factor
    tensors, ranks, alphas = {}, {}, {}
    for name, m in wrapped.items():
        A, B = converted_lora(m)
        ranks[name] = A.shape[0]
        alphas[name] = m.lora_alpha * (alpha_factor if m.init in BASE_CHANGING else 1)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if isinstance(m, LoRAEmbedding)
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PEFT_PREFIX}{name}.{a_key}"] = A.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.{b_key}"] = B.contiguous().cpu()
        if m.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = (
                m.lora_magnitude_vector.detach().contiguous().cpu()
            )
    for name, module in model.named_modules():
        if name and modules_to_save and matches(name, modules_to_save):
            for key, t in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = t.detach().contiguous().cpu().clone()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _jsonable(target_modules),
        "inference_mode": True,
    }
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = str(base_model_name_or_path)
    optional = {
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "modules_to_save": heads or None,
        # PEFT reads pattern keys as regexes matching a name suffix: escape the exact names.
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "use_dora": any(m.use_dora for m in wrapped.values()),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in wrapped.values()),
    }
    config.update({k: v for k, v in optional.items() if v != PEFT_DEFAULTS[k]})
    extra = dict(extra or {})
    if inits:
        config["init_lora_weights"] = True  # converted: a plain LoRA on the original base
        extra["init"] = {"lora_init": inits.pop(), "converted_to_rank": r}
    else:
        gaussian = any(m.init == "gaussian" for m in wrapped.values())
        if gaussian:
            config["init_lora_weights"] = "gaussian"
    quantized = {_quant_name(m.base_layer) for m in wrapped.values() if is_quantized(m.base_layer)}
    if quantized:
        extra["base_quantization"] = quantized.pop()
    files = {WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"})}
    if tokenizer is not None:  # written to a scratch folder, then part of the same atomic set
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer.save_pretrained(scratch)
            files.update({p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()})
    # the config last: a reader never sees a new config next to old weights
    files.update({EXTRA_NAME: _json_bytes(extra), CONFIG_NAME: _json_bytes(config)})
    return atomic_write_files(out_dir, files)


def _quant_name(layer: nn.Module) -> str:
    """``nf4``/``fp4`` for a bitsandbytes 4-bit layer, ``int8`` for an 8-bit one."""
    if type(layer).__name__ == "Linear4bit":
        return getattr(layer.weight, "quant_type", "nf4")
    return "int8"


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _jsonable(targets: str | Sequence[str] | None) -> str | list[str] | None:
    return targets if targets is None or isinstance(targets, str) else list(targets)


def _describes(
    model: nn.Module,
    wrapped: dict[str, LoRALinear | LoRAEmbedding],
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
    heads: list[str],
) -> bool:
    """True when PEFT, reading these targets, would adapt exactly the wrapped layers (layers in
    or under ``heads``, PEFT's ``modules_to_save``, are never adapted)."""

    def selected(name: str) -> bool:
        excluded = bool(exclude_modules) and matches(name, exclude_modules)
        return matches(name, target_modules) and not excluded and not is_under(name, heads)

    plain = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding) or is_conv1d(m)
    ]
    plain = [n for n in plain if not n.endswith(".base_layer")]
    return all(selected(n) for n in wrapped) and not any(selected(n) for n in plain)
