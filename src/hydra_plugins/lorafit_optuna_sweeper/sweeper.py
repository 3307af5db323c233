"""The Hydra `Sweeper`: Hydra builds it from `hydra.sweeper` (see `config.py`) and calls `setup` and
`sweep`; the study loop is in `_study.py`, imported only when a sweep runs (Hydra imports every
public module of a plugin package at start-up, so this one stays free of Optuna)."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class LorafitOptunaSweeper(Sweeper):
    """Optuna ask/tell over Hydra jobs, one job at a time per process; see `config.py` for the
    keys and `_study.run_study` for the loop."""

    def __init__(self, **options: Any) -> None:
        self.options = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in options.items()
        }
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from ._study import run_study

        assert self.config is not None and self.launcher is not None, "setup() runs first"
        run_study(self.options, self.config, self.launcher, arguments)
