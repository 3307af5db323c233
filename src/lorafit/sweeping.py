"""The job side of an Optuna sweep (`+sweep=optuna`): the trial this run belongs to, the Lightning
callback that reports its validation loss for pruning, and the run folder's `pruned.json`.

lorafit's sweeper (`hydra_plugins.lorafit_optuna_sweeper`) sets the trial with `set_trial` before
it launches the trial's job. With the basic (in-process) launcher the job then finds it here, and
`lorafit.train` adds `pruning_callbacks()` to its Trainer. With a launcher that runs jobs in other
processes (joblib, SLURM) no trial is set there: those trials run to their end, unpruned.

Nothing here imports Optuna: a job only meets Optuna's objects when a sweeper handed it a trial.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from lorafit.runinfo import atomic_write

log = logging.getLogger("lorafit")

SWEEPER = "hydra_plugins.lorafit_optuna_sweeper.sweeper.LorafitOptunaSweeper"
_trial: Any = None  # the optuna.Trial of the job running in this process, if any


def set_trial(trial: Any) -> None:
    """Hand the job about to run in this process its `optuna.Trial` (None: no trial)."""
    global _trial
    _trial = trial


def current_trial() -> Any:
    """The `optuna.Trial` of the job running in this process, or None."""
    return _trial


class ValLossPruning(L.Callback):
    """Report `monitor` to an Optuna trial after each validation inside `fit`, at step = the
    optimizer steps done (`trainer.global_step`), and stop the run with `optuna.TrialPruned` when
    the study's pruner says so.

    Optuna-integration's `PyTorchLightningPruningCallback` reports at step = epoch, so the several
    validations of one epoch (`trainer.val_check_interval`) would all land on one step and Optuna
    keeps only the first; short LoRA runs are often a single epoch. The validations that
    `lorafit.train` runs before and after `fit` are not reported.

    Pruning needs the trial in this process: under a multi-process strategy (DDP) the callback
    reports nothing and logs so.

    Raises:
        optuna.TrialPruned: from `on_validation_end`, with `step` and `value` attributes.
    """

    def __init__(self, trial: Any, monitor: str = "val/loss"):
        self.trial, self.monitor, self.active = trial, monitor, True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            self.active = False
            log.warning("Pruning is off: the Optuna trial lives in one process, this run in %d.",
                        trainer.world_size)  # fmt: skip

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value, step = float(value), trainer.global_step
        self.trial.report(value, step)
        if self.trial.should_prune():
            import optuna

            error = optuna.TrialPruned(f"pruned at step {step}: {self.monitor} {value:.4f}")
            error.step, error.value = step, value
            raise error


def pruning_callbacks() -> list[L.Callback]:
    """The callbacks `lorafit.train.make_trainer` adds: pruning when a trial is set, else none."""
    return [ValLossPruning(_trial)] if _trial is not None else []


def is_pruned(error: BaseException) -> bool:
    """Whether `error` is Optuna's `TrialPruned` (False when Optuna was never imported)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(error, optuna.TrialPruned)


def write_pruned(run_dir: Path, error: BaseException, overrides: list[str], seed: int) -> None:
    """`pruned.json` in the run folder: `status: pruned`, the step and validation loss it was
    stopped at, the trial number. A folder with it holds no metrics.json (the run did not finish).
    """
    trial = _trial
    status = {
        "status": "pruned",
        "step": getattr(error, "step", None),
        "val_loss": getattr(error, "value", None),
        "trial": getattr(trial, "number", None),
        "reason": str(error),
        "overrides": overrides,
        "seed": seed,
    }
    atomic_write(run_dir / "pruned.json", json.dumps(status, indent=2) + "\n")
    log.info("Run pruned (recorded in %s/pruned.json): %s", run_dir, error)


def wandb_group(sweeper: Any) -> str | None:
    """The W&B group of a job of lorafit's Optuna sweeper: its study name (else None).

    Args:
        sweeper: the job's `hydra.sweeper` config node.
    """
    if sweeper is not None and sweeper.get("_target_") == SWEEPER:
        return str(sweeper.get("study_name"))
    return None
