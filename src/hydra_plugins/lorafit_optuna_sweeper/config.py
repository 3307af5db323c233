"""The sweeper's structured config, stored in Hydra's ConfigStore as `hydra/sweeper=lorafit_optuna`,
with the samplers (`hydra/sweeper/sampler=tpe|random`) and pruners
(`hydra/sweeper/pruner=none|median|successive_halving|hyperband`) as config groups.

Samplers and pruners are plain `_target_` nodes (Optuna's classes), so any of Optuna's options can
be given, e.g. `hydra.sweeper.pruner.n_warmup_steps=40`. Importing this module imports no Optuna.
No `from __future__ import annotations` here: Hydra's plugin scan runs this module before it is in
`sys.modules`, where `dataclass` looks string annotations up.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LorafitOptunaSweeperConf:
    """`hydra.sweeper` of an Optuna sweep. Each key is read by
    `hydra_plugins.lorafit_optuna_sweeper.sweeper.LorafitOptunaSweeper`.

    Attributes:
        params: the search space, one Hydra override per key with Hydra's sweep syntax:
            `tag(log, interval(1e-5, 1e-2))` (log-uniform float), `interval(0, 1)`,
            `choice(2, 4, 8)`, `range(1, 9, 2)`; a plain value is a fixed override of every trial.
        storage: where the study lives: null = `sqlite:///<hydra.sweep.dir>/optuna.db`; any
            SQLAlchemy URL (`postgresql://user:pw@host/db`) for many machines; or
            `journal:PATH` for Optuna's journal file on a shared file system.
        study_name: the study inside the storage; the same name continues the same study.
        direction: `minimize` or `maximize` the job's return value (`eval_loss_after`).
        n_trials: trials in the whole study, across all workers and restarts (counted in the
            storage; a trial of a dead worker that is run again counts once).
        timeout_s: wall-clock budget in seconds from the study's first start, across workers
            and restarts: no trial is asked after it (a running one finishes). null: none.
        target: stop asking trials once a finished trial's value reaches this (<= when
            minimizing, >= when maximizing). null: none.
        heartbeat_interval_s: a worker writes its running trial's heartbeat into an RDB storage
            this often (Optuna's `RDBStorage(heartbeat_interval=...)`).
        grace_period_s: a running trial without a heartbeat for this long belongs to a dead
            worker: it is marked FAIL and its parameters are asked again (Optuna's
            `RetryHeartbeatStaleTrialCallback`).
        max_retry: how many times one trial's parameters are asked again after dead workers.
    """

    _target_: str = "hydra_plugins.lorafit_optuna_sweeper.sweeper.LorafitOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    # MISSING, not None: the node's own values merge over its defaults list, and only MISSING
    # leaves the chosen `sampler` / `pruner` option in place.
    sampler: Any = MISSING
    pruner: Any = MISSING
    params: dict[str, str] | None = None
    storage: str | None = None
    study_name: str = "lorafit"
    direction: str = "minimize"
    n_trials: int = 20
    timeout_s: float | None = None
    target: float | None = None
    heartbeat_interval_s: int = 60
    grace_period_s: int = 120
    max_retry: int = 3


# Samplers: https://optuna.readthedocs.io/en/stable/reference/samplers/index.html
SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 10},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
}
# Pruners (https://optuna.readthedocs.io/en/stable/reference/pruners.html); the steps they count
# are optimizer steps (the job reports `val/loss` at each validation with its global step).
PRUNERS = {
    "none": {"_target_": "optuna.pruners.NopPruner"},
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 0,
        "interval_steps": 1,
    },
    # ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning")
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": "auto",
        "reduction_factor": 4,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
}

cs = ConfigStore.instance()
cs.store(
    group="hydra/sweeper", name="lorafit_optuna", node=LorafitOptunaSweeperConf, provider="lorafit"
)
for _name, _node in SAMPLERS.items():
    cs.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="lorafit")
for _name, _node in PRUNERS.items():
    cs.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="lorafit")
