"""Load an adapter folder into a base model, strictly: every fault is a ``ValueError`` or an
``OSError`` that names the file and what would fix it.

The faults checked, in the order met: a missing or unreadable ``adapter_config.json`` (and a
wrong ``peft_type``: :mod:`.peft_config`), a missing, truncated or corrupt
``adapter_model.safetensors`` (safetensors' own ``SafetensorError`` is named with the file),
``target_modules`` that name no layer of this base (module names of another architecture), a
weights file none of whose tensors fits the layers the config selects (zero matched keys),
missing or unexpected tensors, and shapes that differ (another rank, or another base's sizes).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from lorafit.adapters.peft_config import CONFIG_NAME, read_adapter_config
from lorafit.lora import (
    TiedEmbeddingsError,
    inject_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    matches,
    unwrap_lora,
)
from lorafit.lora.targets import is_linear

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT writes "<module>.lora_A.weight", "<module>.lora_embedding_A" and
# "<module>.lora_magnitude_vector"; some versions keep the adapter name (".lora_A.default.weight").
PEFT_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<param>lora_(?:embedding_)?[AB]|lora_magnitude_vector)"
    r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?"
)


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    trainable: bool = False,
    untie_embeddings: bool = False,
) -> dict[str, Any]:
    """Inject LoRA into ``model`` as ``adapter_config.json`` says and load the saved tensors.

    No LoRA goes into ``modules_to_save`` modules (PEFT's precedence); the effective scaling of
    the layers is logged. On any error the model is put back as it was (LoRA layers removed,
    flags restored).

    Args:
        model: A fresh base model (no LoRA yet), the one the adapter was trained on.
        adapter_dir: A folder written by :func:`save_adapter` or by PEFT's ``save_pretrained``.
        trainable: Leave the LoRA parameters requiring grad (to train on); by default they are
            frozen, for inference.
        untie_embeddings: Allow LoRA on an output head tied to the input embedding (see
            :func:`~lorafit.lora.inject_lora`).

    Returns:
        The adapter config as a dict.

    Raises:
        FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
        ValueError: Wrong ``peft_type`` or field types, unreadable (truncated, corrupt) weights,
            ``target_modules`` naming no layer of ``model``, no tensor matching the adapted
            layers, missing/unexpected keys, a shape mismatch (named with expected and found
            shapes), or a tied head (:class:`~lorafit.lora.TiedEmbeddingsError`).
        NotImplementedError: The config uses a PEFT feature lorafit lacks.
    """
    config = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / WEIGHTS_NAME
    tensors = read_weights(path)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        inject_lora(
            model,
            config["target_modules"],
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config.get("lora_dropout", 0.0),
            use_rslora=config.get("use_rslora", False),
            exclude_modules=config.get("exclude_modules"),
            rank_pattern=config.get("rank_pattern"),
            alpha_pattern=config.get("alpha_pattern"),
            modules_to_save=config["modules_to_save"],
            untie_embeddings=untie_embeddings,
            use_dora=config.get("use_dora", False),
        )
    except TiedEmbeddingsError:
        raise
    except ValueError as e:  # the targets name no layer here: another architecture
        raise ValueError(
            f"{Path(adapter_dir) / CONFIG_NAME}: {_unmatched(model, config, e)} "
            + _which_base(config)
        ) from None
    try:
        _copy_tensors(model, tensors, config, path)
    except BaseException:
        unwrap_lora(model, merge=False)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        raise
    for p in lora_parameters(model):
        p.requires_grad_(trainable)
    groups = Counter((m.r, m.lora_alpha, m.scaling) for _, m in lora_modules(model))
    root = "sqrt(r)" if config["use_rslora"] else "r"
    logger.info(
        "Loaded %s: %d LoRA layers; effective scaling lora_alpha/%s = %s.",
        adapter_dir,
        sum(groups.values()),
        root,
        "; ".join(
            f"{a:g}/{f'sqrt({r})' if config['use_rslora'] else r} = {s:g} on {n} layer(s)"
            for (r, a, s), n in groups.items()
        ),
    )
    return config


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file, with faults named by file.

    Args:
        path: An ``adapter_model.safetensors`` (or any safetensors file).

    Returns:
        ``{key: tensor}`` on the CPU.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: It is not a readable safetensors file (truncated, corrupt header, offsets
            past its end: safetensors' ``SafetensorError``, named here with the file).
        OSError: It cannot be read (permission).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {path.name} in {path.parent} (expected {path}).")
    data = path.read_bytes()
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({len(data)} bytes): truncated or corrupt "
            f"({type(exc).__name__}: {exc}). Copy the file again, or save the adapter again "
            "from its run (its checkpoint: `lorafit train resume=RUN_DIR`)."
        ) from None


def _unmatched(model: nn.Module, config: dict[str, Any], error: ValueError) -> str:
    """Which ``target_modules`` entry names no layer of ``model``, and the layers it has."""
    targets = config["target_modules"]
    entries = [targets] if isinstance(targets, str) else targets
    names = [n for n, _ in model.named_modules() if n]
    spec = (lambda e: e) if isinstance(targets, str) else (lambda e: [e])
    missing = [e for e in entries if not any(matches(n, spec(e)) for n in names)]
    if not missing:  # another cause, e.g. exclude_modules removes every target
        return f"its LoRA layers cannot be put into this base model: {error}"
    linear = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m))
    return (
        f"target_modules entry {missing[0]!r} ({len(missing)} of {len(entries)} entries) names "
        f"no layer of this base model ({type(model).__name__}, whose Linear layers are "
        f"{', '.join(linear)})."
    )


def _which_base(config: dict[str, Any]) -> str:
    """The advice on a mismatch: the base the adapter names, and how to pass another."""
    base = config.get("base_model_name_or_path")
    named = f"base_model_name_or_path={base!r}" if base else "the base it was trained on"
    return (
        f"The adapter was probably made for another base model: load it on {named} "
        "(`lorafit merge/generate/analyze --base DIR_OR_BUILTIN`)."
    )


def _copy_tensors(
    model: nn.Module, tensors: dict[str, Tensor], config: dict[str, Any], path: Path
) -> None:
    """Map PEFT keys to lorafit's, check names and shapes, and copy into ``model``."""
    expected = lora_state_dict(model)
    extra = {}  # modules_to_save tensors, keyed like model.state_dict()
    found: dict[str, Tensor] = {}
    for key, t in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        m = PEFT_LORA_KEY.fullmatch(key)
        if m:  # lorafit keeps an embedding's A and B as lora_A (r, in) and lora_B (out, r)
            found[f"{m['module']}.{m['param'].replace('embedding_', '')}"] = t
        else:
            extra[key] = t
    if not any(k in expected for k in found):
        seen = f"its keys look like {next(iter(tensors))!r}" if tensors else "it holds no tensor"
        raise ValueError(
            f"{path} would load with zero matched keys: none of its {len(tensors)} tensors is one "
            f"of the {len(expected)} LoRA tensors that target_modules selects in this model (e.g. "
            f"{PEFT_PREFIX}{next(iter(expected), '?')}.weight); {seen}. Give the folder that "
            f"`lorafit train` or PEFT's save_pretrained wrote. {_which_base(config)}"
        )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: {len(missing)} LoRA tensors missing (first: "
            f"{missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]}): other "
            f"module names or other target_modules. {_which_base(config)}"
        )
    own = model.state_dict()
    stray = [k for k in extra if k not in own]
    if stray:
        raise ValueError(
            f"{path}: tensor {stray[0]!r} names nothing in this model (of {len(stray)} such). "
            f"{_which_base(config)}"
        )
    pairs = [(k, expected[k], found[k]) for k in expected] + [(k, own[k], extra[k]) for k in extra]
    for key, dst, src in pairs:
        if dst.shape != src.shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(src.shape)} but this model expects "
                f"{tuple(dst.shape)}. {mismatch_cause(key, dst.shape, src.shape, config)}"
            )
    with torch.no_grad():
        for _, dst, src in pairs:
            dst.copy_(src)


def mismatch_cause(key: str, expected: torch.Size, found: torch.Size, config: dict) -> str:
    """Name the likely cause of a shape mismatch: the rank dimension or the base's sizes.

    Args:
        key: The tensor's name, ending in ``lora_A`` (shape ``(r, in)``), ``lora_B``
            (``(out, r)``) or another parameter (a head saved whole).
        expected: Its shape in the model; found: its shape in the file.
        config: The adapter config (``r``, ``base_model_name_or_path``).
    """
    # lora_A is (r, in_features), lora_B is (out_features, r): the other dimension is the base's.
    rank_dim = {"lora_A": 0, "lora_B": 1}.get(key.rsplit(".", 1)[-1])
    if rank_dim is not None and len(found) == 2 and expected[1 - rank_dim] == found[1 - rank_dim]:
        return (
            f"Only the rank differs ({found[rank_dim]} in the weights, {expected[rank_dim]} from "
            f"the config's r={config['r']} / rank_pattern): adapter_config.json does not match "
            "adapter_model.safetensors (another rank was trained); fix r or rank_pattern there."
        )
    if rank_dim is not None and len(found) == 2:
        side = "in_features" if rank_dim == 0 else "out_features"
        return (
            f"The layer's {side} is {expected[1 - rank_dim]} in this model but "
            f"{found[1 - rank_dim]} in the adapter (other hidden/intermediate sizes). "
            + _which_base(config)
        )
    return _which_base(config)
