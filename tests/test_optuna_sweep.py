"""lorafit's Optuna sweeper (`+sweep=optuna`): a study in sqlite that survives SIGKILL, two workers
sharing one study, a pruner stopping bad trials; real `lorafit train -m` processes on a tiny random
Llama with SmolLM2's tokenizer (a few optimizer steps per trial)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.lorafit_optuna_sweeper._study import (
    REQUEUED,
    STARTED,
    SURPLUS,
    counted,
    search_space,
    stop_reason,
    suggest,
)
from lorafit.config import CONF_DIR
from lorafit.train import make_trainer
from tiny_runs import save_tiny_smol


def test_search_space_in_hydra_sweep_syntax():
    space, fixed = search_space(
        {"optimizer.lr": "tag(log, interval(1e-5, 1e-2))", "lora.r": "choice(2, 4, 8)"},
        ["lora.r=range(2, 9, 2)", "lora.lora_dropout=interval(0.0, 0.2)", "trainer.max_steps=3"],
    )
    assert space == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True),
        "lora.r": IntDistribution(2, 8, step=2),  # the command line replaces params' choice
        "lora.lora_dropout": FloatDistribution(0.0, 0.2),
    }
    assert fixed == ["trainer.max_steps=3"]
    seeds, _ = search_space({"seed": "choice(1, 2)"}, [])
    assert seeds == {"seed": CategoricalDistribution([1, 2])}
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.params\.data\.path.*choice"):
        search_space({"data.path": "glob(*)"}, [])


def test_seeded_workers_do_not_propose_the_same_trials(tmp_path):
    """Two workers with the same sampler seed on one study: trial n is sampled with seed + n, so
    the workers' proposals differ, and a rerun of the same trial order gives the same ones."""
    space = {"optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True)}
    sampler = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 42})

    def run(db: str) -> list[float]:
        workers = [optuna.create_study(study_name="s", storage=db)]
        workers.append(optuna.load_study(study_name="s", storage=db))
        asked = []
        for i in range(4):
            study = workers[i % 2]
            trial = study.ask()
            suggest(study, trial, space, sampler)
            asked.append(trial.params["optimizer.lr"])
        return asked

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = run(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(set(first)) == 4
    assert run(f"sqlite:///{tmp_path / 'b.db'}") == first


def test_stop_reasons_count_the_whole_study():
    """n_trials counts every worker's trials but not superseded ones; target and timeout_s."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.set_user_attr(STARTED, time.time() - 100)
    dist = {"x": FloatDistribution(0, 1)}

    def add(**kw) -> None:
        study.add_trial(optuna.create_trial(params={"x": 0.5}, distributions=dist, **kw))

    add(value=3.0)
    add(state=TrialState.RUNNING)  # another worker's
    add(state=TrialState.FAIL, user_attrs={REQUEUED: True})  # Ctrl-C: queued again, below
    add(state=TrialState.WAITING)
    add(state=TrialState.FAIL, user_attrs={SURPLUS: True})
    opts = {"n_trials": 3, "direction": "minimize", "target": None, "timeout_s": None}
    trials = study.get_trials()
    assert [t.number for t in counted(trials)] == [0, 1]
    assert stop_reason(study, opts, trials) is None
    add(state=TrialState.FAIL)  # a failed run counts
    assert stop_reason(study, opts, study.get_trials()) == "n_trials"
    opts["n_trials"] = 10
    assert stop_reason(study, {**opts, "target": 3.0}, trials) == "target"
    assert stop_reason(study, {**opts, "target": 2.9}, trials) is None
    assert stop_reason(study, {**opts, "target": 3.5, "direction": "maximize"}, trials) is None
    assert stop_reason(study, {**opts, "timeout_s": 99}, trials) == "timeout_s"
    assert stop_reason(study, {**opts, "timeout_s": 200}, trials) is None


def test_optuna_preset_composes_with_pruner_and_study_folder():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["+sweep=optuna"], return_hydra_config=True)
        off = compose(
            "train", ["+sweep=optuna", "hydra/sweeper/pruner=none"], return_hydra_config=True
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("LorafitOptunaSweeper")
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert off.hydra.sweeper.pruner._target_ == "optuna.pruners.NopPruner"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 42
    assert cfg.hydra.sweep.dir.endswith("multirun/optuna/lorafit")  # one folder per study
    assert cfg.trainer.val_check_interval == 20 and cfg.trainer.check_val_every_n_epoch is None


@pytest.fixture(scope="module")
def quick(tmp_path_factory, smol_tokenizer) -> list[str]:
    tiny = save_tiny_smol(tmp_path_factory.mktemp("tiny"), smol_tokenizer)
    return [
        "+sweep=optuna",
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=16",
        "data.max_length=64",
        "data.eval_batch_size=4",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "samples.num_prompts=0",
        "callbacks=none",
        "eval.general_text=null",
        "threads=1",
        "hydra.sweeper.heartbeat_interval_s=1",
        "hydra.sweeper.grace_period_s=3",
    ]


def worker(sweep: Path, quick: list[str], *overrides: str, log: str = "worker.log"):
    """One `lorafit train -m` process on the study in `sweep` (output to `sweep/../<log>`)."""
    command = [sys.executable, "-m", "lorafit.cli", "train", "-m", *quick, *overrides]
    out = open(sweep.parent / log, "w")  # noqa: SIM115 (closed with the process)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*command, f"hydra.sweep.dir={sweep}"], stdout=out, stderr=subprocess.STDOUT, env=env
    )
    proc.log = sweep.parent / log
    return proc


def finish(proc, timeout: int = 300) -> str:
    proc.wait(timeout=timeout)
    text = proc.log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


DONE = (TrialState.COMPLETE,)


def study(sweep: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="lorafit", storage=f"sqlite:///{sweep / 'optuna.db'}")


@pytest.mark.slow
def test_study_killed_mid_trial_resumes_with_the_same_command(tmp_path, quick):
    sweep = tmp_path / "sweep"
    first = worker(sweep, quick, "hydra.sweeper.n_trials=6", log="first.log")
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        try:  # (opening a sqlite file that is not there yet would create it)
            if (sweep / "optuna.db").is_file() and len(study(sweep).get_trials(states=DONE)) >= 2:
                break
        except KeyError:  # the worker has not created the study inside yet
            pass
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {t.number: (t.params, t.value) for t in study(sweep).trials if t.value is not None}
    assert sorted(before) == [0, 1], first.log.read_text()[-3000:]
    metrics = {n: (sweep / f"{n}/metrics.json").read_bytes() for n in before}

    log = finish(worker(sweep, quick, "hydra.sweeper.n_trials=6", log="second.log"))
    trials = study(sweep).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6, [(t.number, t.state) for t in trials]
    for n, (params, value) in before.items():  # finished trials are kept as they were
        assert (trials[n].params, trials[n].value) == (params, value)
        assert (sweep / f"{n}/metrics.json").read_bytes() == metrics[n]
    assert "#0 :" not in log and "#1 :" not in log  # the resumed worker did not rerun them
    killed = [t for t in trials if t.state == TrialState.FAIL]  # the trial running at the kill
    if killed:  # (none when the kill came between two trials)
        (dead,) = killed
        (again,) = [t for t in trials if dead.number in t.system_attrs.get("retry_history", [])]
        assert again.params == dead.params and again.state == TrialState.COMPLETE
    md = (sweep / "summary.md").read_text()
    assert "6 ok" in md and "6 complete" in md, md
    for n, (_, value) in before.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {n} |"))
        assert f"{value:.4f}" in row and "| ok |" in row
    if killed:
        assert f"trial {dead.number} as trial {again.number}" in md
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(t.value for t in done)
    assert (sweep / "optuna_history.png").stat().st_size > 10_000
    assert (sweep / "optuna_parallel.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, quick):
    sweep = tmp_path / "sweep"
    workers = [worker(sweep, quick, "hydra.sweeper.n_trials=6", log=f"w{i}.log") for i in (0, 1)]
    logs = [finish(w) for w in workers]
    trials = study(sweep).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    launched = [  # Hydra logs "#<job num> : <overrides>" for each job it starts
        sorted(int(line.split("#")[1].split(" :")[0]) for line in log.splitlines() if "\t#" in line)
        for log in logs
    ]
    assert all(launched), launched  # both workers ran trials: no batch barrier, no idle worker
    assert sorted(launched[0] + launched[1]) == list(range(6))  # every trial once, none twice
    assert len({t.params["optimizer.lr"] for t in trials}) == 6  # no worker repeats another
    for t in trials:
        m = json.loads((sweep / f"{t.number}/metrics.json").read_text())
        assert m["eval_loss_after"] == t.value and m["lora_r"] == t.params["lora.r"]


@pytest.mark.slow
def test_pruner_stops_trials_in_a_bad_region(tmp_path, quick):
    """On the tiny random model a learning rate of 1e-9 cannot move the loss: the bad region."""
    sweep = tmp_path / "sweep"
    log = finish(
        worker(
            sweep,
            quick,
            "hydra.sweeper.n_trials=4",
            "trainer.max_steps=4",
            "trainer.val_check_interval=1",
            "hydra.sweeper.pruner.n_startup_trials=1",
            "hydra.sweeper.sampler.seed=0",
            'hydra.sweeper.params={optimizer.lr: "choice(1e-9, 0.1)", lora.r: "choice(4)"}',
        )
    )
    trials = study(sweep).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state, t.params) for t in trials]
    for t in pruned:
        status = json.loads((sweep / f"{t.number}/pruned.json").read_text())
        assert status["status"] == "pruned" and status["trial"] == t.number
        assert status["step"] < 4 and status["step"] == max(t.intermediate_values)
        assert status["val_loss"] == t.intermediate_values[status["step"]]
        assert t.params["optimizer.lr"] == 1e-9
        assert not (sweep / f"{t.number}/metrics.json").exists()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done and all(sorted(t.intermediate_values) == [1, 2, 3, 4] for t in done)
    md = (sweep / "summary.md").read_text()
    assert f"{len(pruned)} pruned" in md
    for t in pruned:
        row = next(line for line in md.splitlines() if line.startswith(f"| {t.number} |"))
        assert "| pruned |" in row
        assert f"trial {t.number} at step {max(t.intermediate_values)}" in md
    assert "Error executing job" not in log  # a pruned trial is no error


def test_wandb_group_is_the_study(tmp_path, monkeypatch):
    """One W&B group per study (every worker's trials together), one W&B run per trial."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["+sweep=optuna", "logger=wandb", "callbacks=none", "hydra.mode=MULTIRUN"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [*overrides, "hydra.sweeper.study_name=r_lr"], True)
        grid = compose("train", ["+sweep=rank_grid", *overrides[1:]], True)
    groups = []
    for c in (cfg, grid):
        with open_dict(c):
            c.hydra.runtime.output_dir = str(tmp_path)
            c.hydra.job.override_dirname = "lora.r=4"
        HydraConfig.instance().set_config(c)
        job = copy.deepcopy(c)  # the job's config, as Hydra's run_job hands it to the task
        with open_dict(job):
            del job.hydra
        trainer = make_trainer(job, torch.nn.Linear(2, 2))
        logger = next(lg for lg in trainer.loggers if isinstance(lg, WandbLogger))
        groups.append(logger._wandb_init["group"])
        assert logger._wandb_init["name"] == "lora.r=4"
    assert groups[0] == "r_lr" and groups[1] != "r_lr"  # a grid keeps its DAY/TIME folder
