"""Save and load LoRA adapters in PEFT's on-disk format.

A folder holds ``adapter_config.json`` (the PEFT ``LoraConfig`` fields that differ from PEFT's
defaults, so PEFT releases back to 0.12 read it; read strictly by :mod:`.peft_config`),
``lorafit.json`` (lorafit's own metadata: config hash, versions, label names; returned
under ``"lorafit"`` by :func:`read_adapter_config`) and ``adapter_model.safetensors``, whose keys
read ``base_model.model.<module>.lora_A.weight``, so ``peft.PeftModel.from_pretrained`` loads it and
:func:`load_adapter` loads folders that PEFT wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from lorafit.adapters.peft_config import (
    CONFIG_NAME,
    EXTRA_NAME,
    PEFT_DEFAULTS,
    read_adapter_config,
)
from lorafit.lora import (
    ALL_LINEAR,
    LoRALinear,
    inject_lora,
    is_under,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    matches,
    unwrap_lora,
)
from lorafit.runinfo import atomic_write, staged_dir

__all__ = [  # with the names of lorafit.adapters.peft_config, re-exported here
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "load_adapter",
    "save_adapter",
    "CONFIG_NAME",
    "EXTRA_NAME",
    "PEFT_DEFAULTS",
    "read_adapter_config",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT writes "<module>.lora_A.weight"; some versions keep the adapter name
# (".lora_A.default.weight").
_PEFT_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<param>lora_[AB])(?:\.[^.]+)?\.weight")


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
) -> Path:
    """Write the LoRA tensors of ``model`` (and ``modules_to_save``) as a PEFT adapter folder.

    Per-module ranks or alphas that differ from ``r``/``lora_alpha`` are written as PEFT's
    ``rank_pattern``/``alpha_pattern``. ``"all-linear"`` is written as the full names of the
    wrapped modules (as PEFT 0.21 itself does), so PEFT adapts exactly the same layers; so are
    targets with ``exclude_modules`` (a key PEFT < 0.14 cannot read), targets that also name
    layers inside ``modules_to_save`` (PEFT releases differ there), and targets that do not
    describe the model's LoRA layers (with a warning), e.g. when ``exclude_modules`` was not
    passed. Only fields that differ from PEFT's defaults are written, plus ``peft_type``,
    ``task_type``, ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``.

    Args:
        model: A model with LoRA injected.
        out_dir: Folder to create, or whose two files to replace.
        r, lora_alpha, lora_dropout, target_modules, use_rslora, exclude_modules: The LoRA config
            that produced ``model``.
        base_model_name_or_path: Hub id or folder of the base model, for PEFT's config.
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...).
        modules_to_save: Fully trained modules (e.g. a classifier head) saved whole.
        extra: Free-form metadata, written to ``lorafit.json`` beside PEFT's two files.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``model`` has no LoRA layers, or one inside ``modules_to_save``.
    """
    wrapped, alpha = dict(lora_modules(model)), lora_alpha
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
    # "<module>.lora_A" -> "base_model.model.<module>.lora_A.weight"
    tensors = {
        f"{PEFT_PREFIX}{k}.weight": t.contiguous().cpu() for k, t in lora_state_dict(model).items()
    }
    for name, module in model.named_modules():
        if name and modules_to_save and matches(name, modules_to_save):
            for key, t in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = t.detach().contiguous().cpu().clone()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": r,
        "lora_alpha": lora_alpha,
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
        "rank_pattern": {re.escape(n): m.r for n, m in wrapped.items() if m.r != r},
        "alpha_pattern": {
            re.escape(n): m.lora_alpha for n, m in wrapped.items() if m.lora_alpha != alpha
        },
    }
    config.update({k: v for k, v in optional.items() if v != PEFT_DEFAULTS[k]})
    files = {  # weights first: a reader never sees a new config next to old weights
        WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"}),
        EXTRA_NAME: _json_bytes(extra or {}),
        CONFIG_NAME: _json_bytes(config),
    }
    out_dir = Path(out_dir)
    _write_atomic(out_dir, files)
    return out_dir


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _jsonable(targets: str | Sequence[str] | None) -> str | list[str] | None:
    return targets if targets is None or isinstance(targets, str) else list(targets)


def _describes(
    model: nn.Module,
    wrapped: dict[str, LoRALinear],
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
    heads: list[str],
) -> bool:
    """True when PEFT, reading these targets, would adapt exactly the wrapped layers (layers in
    or under ``heads``, PEFT's ``modules_to_save``, are never adapted)."""

    def selected(name: str) -> bool:
        excluded = bool(exclude_modules) and matches(name, exclude_modules)
        return matches(name, target_modules) and not excluded and not is_under(name, heads)

    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plain = [n for n in plain if not n.endswith(".base_layer")]
    return all(selected(n) for n in wrapped) and not any(selected(n) for n in plain)


def _write_atomic(out_dir: Path, files: dict[str, bytes]) -> None:
    """New folder: build it beside ``out_dir`` and rename; existing: replace each file by rename."""
    if out_dir.exists():
        for name, data in files.items():
            atomic_write(out_dir / name, data)
        return
    with staged_dir(out_dir) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


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
        ValueError: Wrong ``peft_type`` or field types, unreadable weights, missing/unexpected
            keys, a shape mismatch (named with expected and found shapes), or a tied head.
        NotImplementedError: The config uses a PEFT feature lorafit lacks.
    """
    config = read_adapter_config(adapter_dir)
    tensors = _read_weights(Path(adapter_dir) / WEIGHTS_NAME)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
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
    )
    try:
        _copy_tensors(model, tensors, config, Path(adapter_dir) / WEIGHTS_NAME)
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


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"No {path.name} in {path.parent} (expected {path}).")
    try:
        return load_safetensors(path.read_bytes())
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from exc


def _copy_tensors(
    model: nn.Module, tensors: dict[str, Tensor], config: dict[str, Any], path: Path
) -> None:
    """Map PEFT keys to lorafit's, check names and shapes, and copy into ``model``."""
    expected = lora_state_dict(model)
    extra = {}  # modules_to_save tensors, keyed like model.state_dict()
    found: dict[str, Tensor] = {}
    for key, t in tensors.items():
        key = key.removeprefix(PEFT_PREFIX)
        m = _PEFT_LORA_KEY.fullmatch(key)
        if m:
            found[f"{m['module']}.{m['param']}"] = t
        else:
            extra[key] = t
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: {len(missing)} LoRA tensors missing (first: "
            f"{missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]}). The adapter "
            "was probably made for another base model or other target_modules."
        )
    own = model.state_dict()
    stray = [k for k in extra if k not in own]
    if stray:
        raise ValueError(
            f"{path}: tensor {stray[0]!r} names nothing in this model (of "
            f"{len(stray)} such); the adapter was made for another base model."
        )
    pairs = [(k, expected[k], found[k]) for k in expected] + [(k, own[k], extra[k]) for k in extra]
    for key, dst, src in pairs:
        if dst.shape != src.shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(src.shape)} but this model expects "
                f"{tuple(dst.shape)}. {_mismatch_cause(key, dst.shape, src.shape, config)}"
            )
    with torch.no_grad():
        for _, dst, src in pairs:
            dst.copy_(src)


def _mismatch_cause(key: str, expected: torch.Size, found: torch.Size, config: dict) -> str:
    """Name the likely cause of a shape mismatch: the rank dimension or the base's sizes."""
    # lora_A is (r, in_features), lora_B is (out_features, r): the other dimension is the base's.
    rank_dim = {"lora_A": 0, "lora_B": 1}.get(key.rsplit(".", 1)[-1])
    if rank_dim is not None and len(found) == 2 and expected[1 - rank_dim] == found[1 - rank_dim]:
        return (
            f"Only the rank differs ({found[rank_dim]} in the weights, {expected[rank_dim]} from "
            f"the config's r={config['r']} / rank_pattern): adapter_config.json does not match "
            "adapter_model.safetensors (another rank was trained); fix r or rank_pattern there."
        )
    return (
        "The adapter was probably made for another base model (other hidden/intermediate "
        "sizes); load it on the base named by base_model_name_or_path in adapter_config.json."
    )
