"""Config checks before any heavy work: every value's type and range (`values`) and overrides of
keys the config lacks (`overrides`), each named with the key, the value and what would fix it.

Structured configs in Hydra's ConfigStore were the other way: they would restate every signature
as a schema and report in Hydra's words, without the range, the closest key or the file that set
the value. These checks read the signatures the objects already have.
"""

from __future__ import annotations

from collections.abc import Mapping

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorafit.config import check_groups, check_target_sweep
from lorafit.schema.overrides import check_override_keys, compose_train
from lorafit.schema.values import RANGES, TYPES, Range, check_values, describe, fits


def check_config(cfg: DictConfig, built: Mapping[str, type]) -> None:
    """Every check of a composed run config that needs no weights or data, in this order: keys
    the objects do not take and groups without `_target_` (`lorafit.config.check_groups`), a
    multirun sweeping `lora.target_modules` over single names (`check_target_sweep`), then the
    type and range of every value (`check_values`). Reads Hydra's runtime config (`HydraConfig`)
    for the group choices, the overrides and the run mode.

    Args:
        built: groups built as these dataclasses (`group_object`) when they lack `_target_`.

    Raises:
        ValueError: from the checks named above; each names the key, the value and the fix;
            also `data.packing` with a flash `model.attn_implementation`.
    """
    hc = HydraConfig.get()
    choices, overrides = hc.runtime.choices, list(hc.overrides.task)
    check_groups(OmegaConf.to_container(cfg, resolve=False), choices, built)
    if hc.mode == RunMode.MULTIRUN:
        check_target_sweep(cfg.lora.get("target_modules"), overrides)
    check_values(cfg, choices, built, overrides)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    if data.get("packing") and "flash" in str(model.get("attn_implementation") or ""):
        raise ValueError(
            f"data.packing=true with model.attn_implementation={model.attn_implementation}: "
            "flash attention keeps packed examples apart only in one flattened row, and packed "
            "batches have several; set model.attn_implementation=sdpa (or eager), or "
            "data.packing=false."
        )


__all__ = [
    "check_config",
    "RANGES",
    "TYPES",
    "Range",
    "check_override_keys",
    "check_values",
    "compose_train",
    "describe",
    "fits",
]
