"""The Optuna part of `lorafit report`: for a sweep of lorafit's Optuna sweeper (`+sweep=optuna`),
the study's trials, best trial, hyperparameter importance and two plots, beside `tradeoff.png`.

The sweeper writes `optimization_results.yaml` (study name, storage URL, best trial) into the sweep
folder; the study itself is read from that storage. Without Optuna installed, or with a storage
that cannot be reached from here (a database server), the report keeps what the YAML says.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import yaml

from lorafit.runinfo import write_figure

log = logging.getLogger("lorafit")

RESULTS = "optimization_results.yaml"
PLOTS = ("optuna_history.png", "optuna_parallel.png")
REQUEUED = "lorafit_requeued"  # the sweeper's user attr on a trial interrupted and queued again


def load_results(root: Path) -> dict[str, Any] | None:
    """`optimization_results.yaml` of the sweep folder `root`, or None when there is none."""
    path = root / RESULTS
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_study(root: Path, res: dict[str, Any] | None = None) -> Any:
    """The `optuna.Study` of the sweep folder `root`, or None (no study, or it cannot be opened:
    logged). A sqlite or journal file that moved with the folder is found in `root`."""
    res = load_results(root) if res is None else res
    if not res or not res.get("storage") or res.get("name") != "lorafit_optuna":
        return None
    try:
        import optuna

        url = str(res["storage"])
        moved = (
            not Path(url.removeprefix("sqlite:///")).is_file() and (root / "optuna.db").is_file()
        )
        if url.startswith("sqlite:///") and moved:  # the folder moved, with its database
            url = f"sqlite:///{(root / 'optuna.db').resolve()}"
        if url.startswith("journal:"):
            backend = optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:"))
            storage: Any = optuna.storages.journal.JournalStorage(backend)
        elif url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise FileNotFoundError(url)  # opening it would create an empty database
        else:
            storage = url
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=res["study_name"], storage=storage)
    except Exception as e:  # the report still has the run folders and the YAML
        log.warning("Optuna study %s in %s not read: %s", res.get("study_name"), res["storage"], e)
        return None


def annotate(rows: list[dict], root: Path) -> None:
    """Say why a trial's run folder is `missing`: a worker died and its trial was run again."""
    study = load_study(root)
    if study is None:
        return
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rerun = {n: t.number for t in trials.values() for n in t.system_attrs.get("retry_history", [])}
    for r in rows:
        trial = trials.get(int(r["run"])) if str(r["run"]).isdigit() else None
        if r["status"] != "missing" or trial is None:
            continue
        if trial.number in rerun:
            r["error"] = (
                f"its worker died (trial {trial.number} failed by Optuna's heartbeat); the same "
                f"parameters ran again as trial {rerun[trial.number]}"
            )
        elif trial.user_attrs.get(REQUEUED):
            r["error"] = (
                f"interrupted (Ctrl-C); trial {trial.number}'s parameters were queued again"
            )
        elif trial.state.name == "RUNNING":
            r["error"] = f"trial {trial.number} is running (or its worker died, not yet noticed)"


def importance(study: Any) -> tuple[dict[str, float] | None, str]:
    """fANOVA hyperparameter importance (Hutter et al. 2014, Optuna's
    `FanovaImportanceEvaluator`, a random forest over the finished trials): (importances summing
    to 1, or None) and a sentence on how it was computed or why it was not."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [
        k for k in (done[0].params if done else {}) if len({str(t.params.get(k)) for t in done}) > 1
    ]
    if len(done) < 2 or not varying:
        return None, (
            f"hyperparameter importance needs at least 2 finished trials with a parameter that "
            f"differs between them (have {len(done)} finished, varying: {varying or 'none'})."
        )
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ImportError) as e:
        return None, f"hyperparameter importance not computed: {e}"
    return dict(values), f"fANOVA over {len(done)} finished trials; sums to 1, higher matters more"


def markdown(root: Path) -> list[str]:
    """summary.md's Optuna section: storage, trial counts, best trial, pruned trials (with the
    step and validation loss they were stopped at), importance, plots. Empty for other sweeps."""
    res = load_results(root)
    if not res:
        return []
    if res.get("name") != "lorafit_optuna":  # a YAML of another sweeper: its best only
        return [f"\nOptuna best: {res.get('best_params')} -> {res.get('best_value')}"]
    lines = ["", f"## Optuna study `{res['study_name']}`", "", f"Storage: `{res['storage']}`."]
    study = load_study(root, res)
    if study is None:
        lines.append(f"Trials (when last written): {res.get('trials')}.")
    else:
        trials = study.get_trials(deepcopy=False)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        lines.append(
            f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        )
        rerun = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])}
        requeued = [t.number for t in trials if t.user_attrs.get(REQUEUED)]
        if requeued:
            lines.append(
                f"\nInterrupted and queued again: trial(s) {', '.join(map(str, requeued))}"
            )
        if rerun:
            lines.append(
                "\nRun again after their worker died (Optuna's heartbeat): "
                + ", ".join(f"trial {n} as trial {m}" for n, m in sorted(rerun.items()))
            )
        pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
        if pruned:
            lines.append(
                "\nPruned (step: val/loss when stopped): "
                + ", ".join(
                    f"trial {t.number} at step {max(t.intermediate_values)} "
                    f"({t.intermediate_values[max(t.intermediate_values)]:.4f})"
                    for t in pruned
                )
            )
    if res.get("best_trial") is not None:
        lines.append(
            f"\n**Best trial: {res['best_trial']}** (run folder {res['best_trial']}): "
            f"{res['best_params']} -> {res['best_value']:.4f}"
        )
    if study is not None:
        values, how = importance(study)
        if values:
            lines += ["", f"Hyperparameter importance ({how}):", ""]
            lines += [f"- `{k}`: {v:.3f}" for k, v in values.items()]
        else:
            lines += ["", how[0].upper() + how[1:]]
    if res.get("best_trial") is not None:  # `plot` draws them once a trial has finished
        lines.append(
            f"\nPlots: {PLOTS[0]} (objective per trial, best so far), {PLOTS[1]} (each finished "
            "trial's parameters and objective)."
        )
    return lines


def plot(root: Path) -> list[Path]:
    """optuna_history.png (objective per trial, best so far) and optuna_parallel.png (each
    finished trial's parameters and objective), drawn by `optuna.visualization.matplotlib` with
    matplotlib's Agg backend (no display, no browser). Returns the files written."""
    study = load_study(root)
    if study is None:
        return []
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as vis

    written = []
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        for name, draw in zip(
            PLOTS, (vis.plot_optimization_history, vis.plot_parallel_coordinate), strict=True
        ):
            ax = draw(study)
            fig = ax.figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            written.append(write_figure(fig, root / name))
    return written
