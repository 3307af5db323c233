"""Overrides of keys the config lacks (`lorafit train lora.rnak=8`): refused before Hydra's own
error (which only suggests a `+`), with the closest keys and the valid ones at that level."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lorafit.config import CONF_DIR, accepted_keys

# Arguments that lorafit's code passes itself, never from the config.
PASSED = {
    "data": ("tokenizer", "seed"),
    "optimizer": ("params",),
    "trainer": ("logger", "callbacks"),
}


def closest_key(cfg: DictConfig, key: str) -> tuple[str | None, str, list[str], str | None]:
    """For a dotted `key` missing from `cfg`: `(closest key or None, the level where the key
    breaks off, the valid keys there, the object there)`. A key the level's object takes but the
    config lacks is valid (with a `+`)."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            child = OmegaConf.select(node, part, throw_on_missing=False)  # `???`: no error here
            node = child if OmegaConf.is_dict(child) else None
            continue
        level = ".".join(parts[:i])
        valid = [str(k) for k in node] if isinstance(node, DictConfig) else []
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target:
            try:
                valid += [k for k in accepted_keys(get_object(target)) or [] if k not in valid]
            except Exception:  # a broken _target_: validate() names it
                pass
        skip = PASSED.get(level, ("hydra",) if not level else ())
        valid = [k for k in valid if not k.startswith("_") and k not in skip]
        close = difflib.get_close_matches(part, valid, n=1, cutoff=0.4)  # rnak -> r
        closest = ".".join([*parts[:i], close[0], *parts[i + 1 :]]) if close else None
        return closest, level, valid, target
    return None, "", [], None


def unknown_override_message(cfg: DictConfig, overrides: list[str]) -> str:
    """The error for overrides (`lora.rnak=8`) of keys that `cfg` (composed without them) lacks."""
    hints = []
    for line in overrides:
        key = line.partition("=")[0]
        closest, level, valid, target = closest_key(cfg, key)
        in_file = (
            closest is not None and OmegaConf.select(cfg, closest, default=KeyError) is not KeyError
        )
        last = "." not in key[len(level) + 1 if level else 0 :]
        if closest == key and last:  # the object takes it; the file does not set it
            hint = f"{key} is not in the config file, though {target} takes it: write +{line}"
        elif closest and closest != key:
            hint = f"{key} is not a config key (did you mean {'' if in_file else '+'}{closest}?)"
        else:
            hint = f"{key} is not a config key"
        if valid and not (closest == key and last):
            where = f"{level} ({target})" if target else level or "the top level"
            hint += f"; valid keys of {where}: {', '.join(valid)}"
        hints.append(hint)
    return "Unknown config key(s) on the command line: " + "; ".join(hints) + "."


def compose_train(overrides: list[str], return_hydra_config: bool = True) -> DictConfig:
    """Compose lorafit's `train` config with Hydra's compose API (no run folder, no logging set
    up), as `lorafit train OVERRIDES` would.

    Raises:
        ValueError: an override of a key the config lacks (`lora.rnak=8`), naming the closest
            keys; Hydra's `ConfigCompositionException` for any other composition error.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    rest, unknown = list(overrides), []
    while True:
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("train", overrides=rest, return_hydra_config=return_hydra_config)
            break
        except ConfigCompositionException as e:
            match = re.match(r"Could not override '([^']+)'", str(e))
            bad = [o for o in rest if match and o.split("=", 1)[0] == match.group(1)]
            if not bad:
                raise
            unknown.append(bad[0])
            rest.remove(bad[0])
    if unknown:
        raise ValueError(unknown_override_message(cfg, unknown))
    return cfg


# Hydra's own options that take a config folder or name: a config that is not lorafit's `train`.
_OTHER_CONFIG = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def check_override_keys(argv: list[str]) -> None:
    """Before Hydra's `main` runs `lorafit train ARGV`: refuse an override of a key the config
    lacks with the closest keys (Hydra's own message only suggests a `+`). Costs one composition,
    only when ARGV sets a value (not just group choices); a sweep's first value stands for it.

    Raises:
        ValueError: from `compose_train`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException

    if any(a.split("=", 1)[0] in (*_OTHER_CONFIG, "--experimental-rerun") for a in argv):
        return
    lines = [a for a in argv if not a.startswith("-") and "=" in a]
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}  # `lora=dora`: a choice
    keys = [a.split("=", 1)[0] for a in lines if a[0] not in "+~"]
    if not any(k not in groups and not k.startswith(("hydra.", "hydra/")) for k in keys):
        return
    try:
        overrides = []
        for o in OverridesParser.create().parse_overrides(lines):
            if not o.is_sweep_override():
                overrides.append(o.input_line)
                continue
            first = next(iter(o.sweep_string_iterator()), None)  # choice and range sweeps
            if first is None:
                return
            overrides.append(f"{o.get_key_element()}={first}")
    except (HydraException, ValueError, TypeError):  # Hydra reports its own syntax errors
        return
    try:
        compose_train(overrides, return_hydra_config=False)
    except ConfigCompositionException:
        return
