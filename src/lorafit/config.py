"""Where lorafit's Hydra configs live, the `sweep` config group, the resolvers the configs use, and
the checks that turn a config node into its object with errors that name the key.

`CONF_DIR` and `SWEEPS_DIR` are the checkout's top-level `conf/` and `sweeps/` when lorafit runs
from a source checkout (editable install), else the copies the wheel carries inside the package
(`lorafit/conf`, `lorafit/sweeps`). Importing this module registers every `sweeps/*.yaml` in Hydra's
ConfigStore as group `sweep`, so `lorafit train -m +sweep=rank_grid` works with either layout.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parents[1]  # <checkout>/src/lorafit -> <checkout>


def _data_dir(name: str) -> str:
    """`<checkout>/<name>` when this file is `<checkout>/src/lorafit/`, else `lorafit/<name>`."""
    in_checkout = _PACKAGE.parent.name == "src" and (_CHECKOUT / name).is_dir()
    return str(_CHECKOUT / name if in_checkout else _PACKAGE / name)


CONF_DIR = _data_dir("conf")
SWEEPS_DIR = _data_dir("sweeps")
SWEEP_GROUP = "sweep"

_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(\S+)\s*$")


def _package_header(path: Path) -> str | None:
    """The `# @package X` line among a YAML file's leading comments, as Hydra reads it."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if match := _PACKAGE_HEADER.match(line):
            return match.group(1)
    return None


def register_sweeps(sweeps_dir: str | os.PathLike = SWEEPS_DIR) -> list[str]:
    """Store each `sweeps_dir/*.yaml` in Hydra's ConfigStore as `sweep/<stem>`.

    The node keeps its `defaults:` list (Hydra reads it from ConfigStore nodes as from files, so
    `override /hydra/sweeper: lorafit_optuna` works) and the file's `# @package` header. Storing
    the same name again replaces it, so calling this twice is harmless.

    Returns:
        The names stored, sorted.
    """
    names = []
    for path in sorted(Path(sweeps_dir).glob("*.yaml")):
        ConfigStore.instance().store(
            group=SWEEP_GROUP,
            name=path.stem,
            node=OmegaConf.load(path),
            package=_package_header(path),
            provider="lorafit",
        )
        names.append(path.stem)
    return names


register_sweeps()

if not OmegaConf.has_resolver("lorafit.wandb_offline"):
    OmegaConf.register_new_resolver(
        "lorafit.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY")
    )
if not OmegaConf.has_resolver("lorafit.mul"):  # sweeps: lora_alpha = ${lorafit.mul:2,${lora.r}}
    OmegaConf.register_new_resolver("lorafit.mul", lambda a, b: None if b is None else a * b)


# -- config nodes -> objects -----------------------------------------------------------------------


def plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them) -> plain dicts/lists; anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def accepted_keys(target: Callable) -> list[str] | None:
    """The keyword arguments `target` (a class or function) takes; None when it takes any."""
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target) if f.init]
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let it judge its arguments
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# `trainer.*` keys that lorafit reads itself (`lorafit.train.make_trainer` removes them).
TRAINER_EXTRA_KEYS = ("skip_nonfinite_batches", "compile")


def check_keys(node: dict | DictConfig, target: Callable, key: str, origin: str = "") -> None:
    """Refuse a key of `node` that `target` does not take (a typo, or an option lorafit lacks),
    instead of a TypeError from deep inside Hydra or a key that silently does nothing.

    Args:
        key: the node's place in the config, e.g. `lora` or `callbacks.checkpoint`.
        origin: where the node came from, e.g. `lora=small`, for the message.

    Raises:
        ValueError: names each unknown key, the closest valid one, and all valid keys.
    """
    valid = accepted_keys(target)
    if valid is None:
        return
    if key == "trainer":  # lorafit's own trainer options, taken out before Lightning sees them
        valid = [*valid, *TRAINER_EXTRA_KEYS]
    unknown = [str(k) for k in node if not str(k).startswith("_") and k not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)  # rnak -> r
        hints.append(f"{key}.{name}" + (f" (did you mean {key}.{close[0]}?)" if close else ""))
    source = f" (set by {origin} or a `+{key}.{unknown[0]}=...` override)" if origin else ""
    raise ValueError(
        f"Unknown config key(s): {', '.join(hints)}{source}; "
        f"{target.__module__}.{target.__qualname__} has no such option. "
        f"Valid keys: {', '.join(valid)}."
    )


def target_nodes(node: Any, key: str = "") -> Iterator[tuple[str, dict]]:
    """`(key, node)` for every node with a `_target_` in a plain (to_container) config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            yield from target_nodes(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from target_nodes(v, f"{key}[{i}]")


def group_object(cls: type, node: DictConfig, key: str, origin: str = ""):
    """The object of a config group that maps to the dataclass `cls` (`model`, `lora`).

    A node without `_target_` (a user's own `conf/lora/small.yaml` holding only `r: 4`) builds
    `cls` directly, its unset fields taken from `cls`'s defaults; a `_target_` naming another
    class is instantiated by Hydra.

    Raises:
        ValueError: a key `cls` (or the `_target_`) does not take; see `check_keys`.
    """
    target = node.get("_target_")
    made = get_object(target) if target else cls
    check_keys(node, made, key, origin)
    if made is not cls:
        return instantiate(node, _convert_="all")
    values = OmegaConf.to_container(node, resolve=True)
    return cls(**{k: v for k, v in values.items() if not str(k).startswith("_")})


def check_groups(plain: dict, choices: Mapping[str, Any], built: dict[str, type]) -> None:
    """Check every object node of a composed run config before anything is built.

    Args:
        plain: the config as plain containers, interpolations unresolved.
        choices: the group options Hydra chose (`hydra.runtime.choices`), for the messages.
        built: groups lorafit builds as these dataclasses with `group_object`, where no
            `_target_` is needed.

    Raises:
        ValueError: a group (other than `built`) without `_target_`, or a key the object of its
            node does not take (a typo in a file, `+model.gradient_checkpointing=true`).
    """
    for group in ("task", "data", "optimizer", "scheduler", "trainer"):
        if isinstance(plain.get(group), dict) and "_target_" not in plain[group]:
            raise ValueError(
                f"{group}={choices.get(group)} has no _target_ (the class or function it builds); "
                f"start the file with `defaults: [<a shipped {group}>, _self_]` or give _target_."
            )
    for key, node in target_nodes(plain):
        origin = f"{key}={choices[key]}" if choices.get(key) else ""
        check_keys(node, get_object(node["_target_"]), key, origin)
    for group, cls in built.items():
        if isinstance(plain.get(group), dict) and "_target_" not in plain[group]:
            check_keys(plain[group], cls, group, f"{group}={choices.get(group)}")


def check_target_sweep(targets: Any, overrides: list[str]) -> None:
    """In a multirun job: refuse `lora.target_modules` set to one bare name by an override.

    `-m lora.target_modules=q_proj,v_proj` is a sweep to Hydra (a bare comma), one job per single
    name, and a single string is a regex that must match a whole module name: nothing matches.

    Raises:
        ValueError: says so, with the list form to write instead.
    """
    key = "lora.target_modules="
    if not isinstance(targets, str) or not re.fullmatch(r"\w+", targets):
        return
    if not any(o.lstrip("+~").startswith(key) for o in overrides):
        return
    # The sweep as typed (sys.argv) is there when jobs run in this process (the basic launcher).
    given = next((a for a in sys.argv if a.lstrip("+~").startswith(key)), "")
    names = given.split("=", 1)[1] if given and "[" not in given else f"{targets},..."
    raise ValueError(
        f"lora.target_modules={targets!r} in a multirun: Hydra reads a bare comma in an override "
        f"as a sweep, so `{given or key + names}` runs one job per single name, and a string is "
        "a regex that must match the whole module name (e.g. "
        f"'model.layers.0.self_attn.{targets}'), so '{targets}' alone matches nothing. For the "
        f"module list write lora.target_modules='[{names}]' (quotes needed in a multirun)."
    )
