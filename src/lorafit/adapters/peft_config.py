"""``adapter_config.json``: PEFT's ``LoraConfig`` fields, read strictly.

Reading checks every field lorafit uses for its type (``"use_rslora": "false"`` is an error, not
rsLoRA on), refuses PEFT features lorafit does not implement, and names fields it does not know.
Writing (:mod:`lorafit.adapters`) keeps only fields that differ from :data:`PEFT_DEFAULTS`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
EXTRA_NAME = "lorafit.json"  # lorafit metadata, kept out of PEFT's config
PEFT_DEFAULTS = {
    "task_type": None,
    "base_model_name_or_path": None,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "exclude_modules": None,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
    "fan_in_fan_out": False,  # lorafit decides per layer: Conv1D is (in, out), Linear (out, in)
}
# Fields lorafit cannot honour, with the value that means "off"; any other value is refused.
_UNSUPPORTED = {
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "megatron_config": None,
    "ensure_weight_tying": False,
}
# Fields that change nothing once the trained tensors are loaded: metadata, init-time options.
_HARMLESS = {
    "init_lora_weights", "auto_mapping", "peft_version",
    "revision", "inference_mode", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config", "megatron_core", "qalora_group_size", "lorafit",
}  # fmt: skip
# init_lora_weights whose saved tensors go with a base that PEFT changed at initialisation.
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``adapter_config.json`` and check that it is a LoRA config lorafit can load.

    lorafit's ``lorafit.json`` (absent in PEFT-made folders) comes back under ``"lorafit"``.
    Absent fields lorafit uses come back with PEFT's defaults; fields it does not know are named
    in a warning.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Not JSON, ``peft_type`` is not ``"LORA"``, ``target_modules`` is missing, a
            field has the wrong type (``"use_rslora": "false"``), or ``lorafit.json`` is not JSON.
        NotImplementedError: The config turns on a PEFT feature lorafit lacks (bias, ...), or
            holds an unconverted PiSSA/OLoRA adapter.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {Path(adapter_dir)} (expected {path}).")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds {type(config).__name__}, not a JSON object.")
    extra = Path(adapter_dir) / EXTRA_NAME
    if extra.is_file():
        try:
            config["lorafit"] = json.loads(extra.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{extra} is not valid JSON ({e}); delete it or rewrite it.") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: field 'peft_type' is {config.get('peft_type')!r}; lorafit loads only 'LORA' "
            "adapters. Load this one with PEFT (PeftModel.from_pretrained), or give the folder of "
            "a LoRA adapter."
        )
    if not config.get("target_modules"):
        raise ValueError(f"{path}: field 'target_modules' is empty; cannot tell what to adapt.")
    _check_fields(path, config)
    return {**copy.deepcopy(PEFT_DEFAULTS), **config}


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_names(v: object) -> bool:
    """A regex string or a list of module names (PEFT's target forms)."""
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_map(v: object, ok: Callable[[object], bool]) -> bool:
    return v is None or isinstance(v, dict) and all(ok(x) for x in v.values())


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {  # field -> (check, what it must be)
    "r": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false (a JSON boolean)"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false (a JSON boolean)"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false (a JSON boolean)"),
    "target_modules": (_is_names, "a regex string or a list of module names"),
    "exclude_modules": (lambda v: v is None or _is_names(v), "null, a regex or a list of names"),
    "modules_to_save": (
        lambda v: v is None or isinstance(v, list) and _is_names(v),
        "null or a list of module names",
    ),
    "rank_pattern": (lambda v: _is_map(v, lambda x: _is_int(x) and x >= 1), "{regex: int >= 1}"),
    "alpha_pattern": (lambda v: _is_map(v, lambda x: _is_num(x) and x > 0), "{regex: number > 0}"),
    "task_type": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "null or a string"),
}


def _check_fields(path: Path, config: dict[str, Any]) -> None:
    """Refuse wrong types and features lorafit lacks; warn about fields it does not know."""
    for key, (ok, want) in _RULES.items():
        if key in config and not ok(config[key]):
            raise ValueError(
                f"{path}: field {key!r} must be {want}, got {config[key]!r} "
                f"({type(config[key]).__name__}); fix it in that file."
            )
    for key, off in _UNSUPPORTED.items():
        value = config.get(key, off)
        if isinstance(off, bool) and value is not None and not isinstance(value, bool):
            raise ValueError(
                f"{path}: field {key!r} must be true or false (a JSON boolean), got {value!r}."
            )
        if value not in (off, None, [], {}):
            raise NotImplementedError(
                f"{path}: {key}={value!r} is a PEFT feature lorafit does not implement; "
                "load this adapter with PEFT instead."
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        raise NotImplementedError(
            f"{path}: init_lora_weights={init!r}: these tensors belong to a base model PEFT "
            "changed at initialisation. Convert the adapter with PEFT first (save_pretrained("
            "..., path_initial_model_for_weight_conversion=...)), or load it with PEFT."
        )
    known = {"peft_type", *_RULES, *_UNSUPPORTED, *_HARMLESS}
    unknown = [
        f"{k}={v!r}" for k, v in config.items() if k not in known and v not in (None, False, [], {})
    ]
    if unknown:
        logger.warning(
            "%s: lorafit does not know the field(s) %s and ignores them; if they change what the "
            "adapter computes, its outputs here differ from PEFT's.",
            path,
            ", ".join(unknown),
        )
