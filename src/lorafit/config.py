"""Where lorafit's Hydra configs live, the `sweep` config group, and the resolvers the configs use.

`CONF_DIR` and `SWEEPS_DIR` are the checkout's top-level `conf/` and `sweeps/` when lorafit runs
from a source checkout (editable install), else the copies the wheel carries inside the package
(`lorafit/conf`, `lorafit/sweeps`). Importing this module registers every `sweeps/*.yaml` in Hydra's
ConfigStore as group `sweep`, so `lorafit train -m +sweep=rank_grid` works with either layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

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
    `override /hydra/sweeper: optuna` works) and the file's `# @package` header. Storing the same
    name again replaces it, so calling this twice is harmless.

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
