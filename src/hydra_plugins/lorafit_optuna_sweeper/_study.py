"""The study loop of `+sweep=optuna`: ask one trial, launch its one job, tell the result.

Every worker (a process started with the same command against the same storage and study name)
runs this loop on its own; the storage is the only thing they share, so trials are pulled
asynchronously (no batch waits for its slowest trial). Optuna's RDB storage makes the workers'
writes safe; its heartbeat tells a live worker's running trial from a dead one's
(`optuna.storages.RDBStorage`, `heartbeat_interval` / `grace_period`), and a dead one's trial is
marked FAIL and its parameters asked again (`RetryHeartbeatStaleTrialCallback`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, Transformer
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from lorafit import sweeping
from lorafit.runinfo import atomic_write

log = logging.getLogger("lorafit")

RESULTS = "optimization_results.yaml"  # the sweep folder's summary of the study (lorafit.report)
SURPLUS = "lorafit_surplus"  # user attr of a trial asked past n_trials by a concurrent worker
STARTED = "lorafit_started"  # study user attr: time.time() of the study's first start
REQUEUED = "lorafit_requeued"  # user attr of a trial interrupted (Ctrl-C) and queued again


def distribution(override: Override) -> BaseDistribution:
    """Optuna's distribution for one sweep override, in Hydra's sweep syntax.

    `choice(a, b)` -> categorical; `range(a, b[, step])` (stop excluded) -> int with step, or
    categorical for floats / `shuffle`; `interval(lo, hi)` -> uniform (int when both ends are
    ints); `tag(log, interval(...))` -> log-uniform.

    Raises:
        ValueError: another sweep kind (a glob), naming `hydra.sweeper.params.<key>`.
    """
    key = override.get_key_element()
    if isinstance(override.value(), Glob):  # a choice over config names: not a search space
        pass
    elif override.is_choice_sweep() or (override.is_range_sweep() and override.value().shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    elif override.is_range_sweep():
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(values[0], values[-1], step=values[1] - values[0])
        return CategoricalDistribution(values)
    elif override.is_interval_sweep():
        value = override.value()
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"hydra.sweeper.params.{key}: {override.input_line!r} is not a search space Optuna "
        "can sample; write choice(a, b, ...), range(start, stop, step), interval(low, high) or "
        "tag(log, interval(low, high))."
    )


def search_space(
    params: dict[str, str] | None, arguments: Sequence[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """`hydra.sweeper.params` and the command line's overrides -> (distributions, fixed overrides).

    A key on the command line replaces the same key of `params`. A sweep override becomes a
    distribution; a plain one is passed to every trial's job unchanged.
    """
    lines = {}
    for line in [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments):
        parsed = OverridesParser.create().parse_overrides([line])[0]
        lines[parsed.get_key_element()] = parsed
    space, fixed = {}, []
    for key, override in lines.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def make_storage(options: dict[str, Any], sweep_dir: Path) -> optuna.storages.BaseStorage:
    """The study's storage from `hydra.sweeper.storage` (see `config.LorafitOptunaSweeperConf`).

    An RDB storage gets Optuna's heartbeat, so that a worker killed mid-trial has its trial failed
    and asked again once `grace_period_s` has passed without a heartbeat. SQLite waits up to 60 s
    for a lock held by another worker instead of failing at once.
    """
    url = options.get("storage") or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.journal.JournalStorage(backend)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the retry callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=options["max_retry"])
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):  # workers started together may race to create the tables
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=options["heartbeat_interval_s"],
                grace_period=options["grace_period_s"],
                heartbeat_stale_trial_callback=retry,
            )
        except Exception:  # sqlalchemy's OperationalError / IntegrityError from the race
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def suggest(
    study: optuna.Study,
    trial: optuna.Trial,
    space: dict[str, BaseDistribution],
    sampler_cfg: DictConfig | None,
) -> None:
    """Sample the trial's parameters. A sampler with a `seed` samples trial n with seed + n (a
    fresh sampler built from `hydra.sweeper.sampler`): workers that share a study all start from
    the same seed and would otherwise propose the same parameters; this way a study is
    reproducible from its seed and its trial order, however many workers run it."""
    seed = sampler_cfg.get("seed") if sampler_cfg is not None else None
    if seed is not None:
        study.sampler = instantiate(sampler_cfg, seed=int(seed) + trial.number)
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_categorical(name, dist.choices)


def storage_url(options: dict[str, Any], sweep_dir: Path) -> str:
    return options.get("storage") or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards `n_trials`: all but WAITING ones (not started), failed ones
    whose parameters were asked again (their retry counts), and surplus asks."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}

    def superseded(t: optuna.trial.FrozenTrial) -> bool:
        marked = t.user_attrs.get(SURPLUS) or t.user_attrs.get(REQUEUED)
        return t.state == TrialState.FAIL and (t.number in retried or bool(marked))

    return [t for t in trials if t.state != TrialState.WAITING and not superseded(t)]


def stop_reason(study: optuna.Study, options: dict[str, Any], trials: list) -> str | None:
    """Why no more trial is asked (`n_trials`, `target`, `timeout_s`), or None."""
    if len(counted(trials)) >= options["n_trials"]:
        return "n_trials"
    target = options.get("target")
    done = [t.value for t in trials if t.state == TrialState.COMPLETE]
    if target is not None and done:
        best = max(done) if options["direction"] == "maximize" else min(done)
        if (best >= target) if options["direction"] == "maximize" else (best <= target):
            return "target"
    timeout = options.get("timeout_s")
    if timeout is not None and time.time() - study.user_attrs[STARTED] >= timeout:
        return "timeout_s"
    return None


class Heartbeat:
    """Records a running trial's heartbeat in an RDB storage every `heartbeat_interval_s` from a
    thread, as `Study.optimize` does (ask/tell leaves it to the caller)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread = None
        if isinstance(storage, optuna.storages.RDBStorage):
            self.interval = storage.get_heartbeat_interval()
            self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def run_trial(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    trial: optuna.Trial,
    fixed: list[str],
    launcher: Any,
) -> TrialState:
    """Launch the trial's one job (folder `<sweep dir>/<trial number>`) and tell the study.

    The job returns the objective (`lorafit.train.main`: `eval_loss_after`), None for a failed
    run, or raises `optuna.TrialPruned` when the pruner stopped it. A worker interrupted during the
    job (Ctrl-C) fails the trial and queues its parameters again before it exits; a killed one
    leaves it to the heartbeat (see the module docstring).
    """
    overrides = [*fixed, *(f"{k}={v}" for k, v in trial.params.items())]
    sweeping.set_trial(trial)  # the job's pruning callback reports to it (in-process launcher)
    try:
        with Heartbeat(storage, trial._trial_id):
            (ret,) = launcher.launch([overrides], initial_job_idx=trial.number)
    except BaseException:
        trial.set_user_attr(REQUEUED, True)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
        log.warning("Trial %d interrupted: failed, its parameters queued again.", trial.number)
        raise
    finally:
        sweeping.set_trial(None)
    if ret.status != JobStatus.COMPLETED:
        # The raised exception, read from the field: the `return_value` property would re-raise
        # it and print "Error executing job", which a pruned trial is not.
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Trial %d pruned: %s", trial.number, error)
            return TrialState.PRUNED
        log.warning("Trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    value = ret.return_value
    if value is None or not math.isfinite(float(value)):
        log.warning(
            "Trial %d failed: the job returned %r (see its failed.json).", trial.number, value
        )
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    study.tell(trial, float(value))
    return TrialState.COMPLETE


def write_results(study: optuna.Study, options: dict[str, Any], sweep_dir: Path) -> dict:
    """`optimization_results.yaml` in the sweep folder: where the study is, how its trials ended,
    the best one (`lorafit report` reads it; every worker rewrites it after each trial)."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    res: dict[str, Any] = {
        "name": "lorafit_optuna",
        "study_name": study.study_name,
        "storage": storage_url(options, sweep_dir),
        "direction": options["direction"],
        "trials": states,
        "best_trial": None,
        "best_params": None,
        "best_value": None,
    }
    if done:
        best = study.best_trial
        res.update(best_trial=best.number, best_params=best.params, best_value=best.value)
    atomic_write(sweep_dir / RESULTS, yaml.safe_dump(res, sort_keys=False))
    return res


def run_study(
    options: dict[str, Any], config: DictConfig, launcher: Any, arguments: list[str]
) -> None:
    """The worker loop (see the module docstring). Ends when `n_trials` trials are finished or
    running elsewhere (then it waits for those, to re-run any of a dead worker), the `target` is
    reached, or `timeout_s` is spent.

    Raises:
        ValueError: a bad `direction`, `n_trials` or search space, naming the key.
    """
    if options["direction"] not in ("minimize", "maximize"):
        raise ValueError(
            f"hydra.sweeper.direction={options['direction']!r}: give minimize or maximize."
        )
    if not isinstance(options["n_trials"], int) or options["n_trials"] < 1:
        raise ValueError(
            f"hydra.sweeper.n_trials={options['n_trials']!r}: give a whole number >= 1."
        )
    space, fixed = search_space(options.get("params"), arguments)
    if not space:
        raise ValueError(
            "hydra.sweeper.params has no search space: give e.g. "
            "hydra.sweeper.params.lora.r='choice(4,8)'."
        )
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(options, sweep_dir)
    study = optuna.create_study(
        study_name=options["study_name"],
        storage=storage,
        sampler=options.get("sampler"),
        pruner=options.get("pruner"),
        direction=options["direction"],
        load_if_exists=True,
    )
    if STARTED not in study.user_attrs:
        study.set_user_attr(STARTED, time.time())
    before = study.get_trials(deepcopy=False)
    log.info(
        "Optuna study %r in %s: %d trial(s) already (%s); search space %s; this worker: %s",
        study.study_name,
        storage_url(options, sweep_dir),
        len(before),
        ", ".join(f"{t.number}: {t.state.name}" for t in before) or "new study",
        {k: repr(v) for k, v in space.items()},
        f"sampler {type(study.sampler).__name__}, pruner {type(study.pruner).__name__}",
    )
    write_results(study, options, sweep_dir)
    ran = 0
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL + asked again
        trials = study.get_trials(deepcopy=False)
        reason = stop_reason(study, options, trials)
        if reason == "n_trials" and isinstance(storage, optuna.storages.RDBStorage):
            if any(t.state == TrialState.RUNNING for t in trials):  # wait: one may be a dead one
                time.sleep(min(options["heartbeat_interval_s"], 10))
                continue
        if reason:
            break
        with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with optimize":
            warnings.simplefilter("ignore", UserWarning)  # `Heartbeat` below records it
            trial = study.ask()
        suggest(study, trial, space, config.hydra.sweeper.get("sampler"))
        # Another worker may have asked the last trial at the same moment: keep n_trials exact.
        ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(ahead) >= options["n_trials"]:
            trial.set_user_attr(SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        run_trial(study, storage, trial, fixed, launcher)
        ran += 1
        write_results(study, options, sweep_dir)
    res = write_results(study, options, sweep_dir)
    log.info(
        "Optuna study %r done (%s reached; %d trial(s) run here): %s; best trial %s %s -> %s",
        study.study_name,
        reason,
        ran,
        res["trials"],
        res["best_trial"],
        res["best_params"],
        res["best_value"],
    )
