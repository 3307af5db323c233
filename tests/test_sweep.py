"""Sweep presets compose as documented; a real tiny multirun survives a broken run and reports."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lorafit.config import CONF_DIR
from lorafit.distributed import set_threads

# SmolLM2-135M linear shapes (in, out) per layer, from DESIGN.md: hidden 576, k/v 192, MLP 1536.
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}


def load(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_rank_grid_ties_alpha_to_rank():
    cfg = load("+sweep=rank_grid", hydra=True)
    assert cfg.hydra.sweeper.params["lora.r"] == "1,2,4,8,16,32,64"
    assert cfg.hydra.callbacks.report._target_ == "lorafit.report.ReportCallback"
    for r in (1, 16, 64):
        assert load("+sweep=rank_grid", f"lora.r={r}").lora.lora_alpha == 2 * r


def test_targets_equal_parameter_budget():
    budgets = {}
    for name in ("attention", "mlp", "all_linear"):
        lora = load("+sweep=targets", f"target_set={name}").lora
        mods = list(SHAPES) if lora.target_modules == "all-linear" else lora.target_modules
        budgets[name] = lora.r * sum(sum(SHAPES[m]) for m in mods)
        assert lora.lora_alpha == 2 * lora.r
    assert budgets["attention"] == 61_440
    assert all(abs(b / budgets["attention"] - 1) < 0.05 for b in budgets.values()), budgets


def test_optuna_full_finetune_and_launchers_compose():
    cfg = load("+sweep=optuna", hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.params["optimizer.lr"].startswith("tag(log")
    assert load("+sweep=full_finetune", "lora=none").lora.target_modules is None
    bbc = load("experiment=minilm_bbc", "+sweep=minilm_bbc", hydra=True)
    assert bbc.hydra.sweeper.params["data.max_length"] == "256,512" and bbc.optimizer.lr == 2e-3
    assert load("hydra/launcher=slurm", hydra=True).hydra.launcher.gpus_per_node == 1
    assert load("hydra/launcher=joblib", hydra=True).hydra.launcher.n_jobs == -1


CORES = os.cpu_count()


@pytest.mark.parametrize(
    ("n_jobs", "threads", "expected"),
    [(2, None, max(1, CORES // 2)), (-1, None, 1), (-2, None, max(1, CORES // (CORES - 1 or 1))),
     (2, 1, 1)],
)  # fmt: skip
def test_parallel_jobs_split_torch_threads(n_jobs, threads, expected):
    cfg = load(
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={n_jobs}",
        f"threads={threads or 'null'}",
        hydra=True,
    )
    before = torch.get_num_threads()
    HydraConfig.instance().set_config(cfg)
    try:
        got = set_threads(cfg)
    finally:
        torch.set_num_threads(before)
    assert got == expected


QUICK = [
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "data.max_train_examples=16",
    "data.eval_batch_size=4",
    "data.max_length=64",
    "samples.num_prompts=0",
    "eval.general_docs=8",
]


@pytest.mark.slow
def test_multirun_with_broken_run_reports_and_reproduces(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", "-m", "lora.r=0,2", *QUICK,
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads((sweep / "0/failed.json").read_text())
    assert "lora.r" in failed["error"] and "lora.r=0" in failed["overrides"]
    m = json.loads((sweep / "1/metrics.json").read_text())
    assert m["trainable_params"] == 30 * 2 * (2 * 1152 + 2 * 768)  # r=2 on q,k,v,o
    assert m["deterministic"] and len(m["data_fingerprint"]) == 16  # datasets' own
    assert m["config"]["lora"]["r"] == 2 and m["config"]["data"]["max_length"] == 64
    md = (sweep / "summary.md").read_text()  # written by the Hydra callback
    assert "1 ok, 1 failed" in md and "**Best run: 1** (`lora.r=2`)" in md
    assert (sweep / "tradeoff.png").stat().st_size > 10_000

    proc = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "reproduce", str(sweep / "1")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Reproduced: identical results" in proc.stdout
    again = json.loads((sweep / "1/reproduce/metrics.json").read_text())
    assert again["eval_loss_after"] == m["eval_loss_after"]
    assert again["config"]["lora"] == m["config"]["lora"]
    assert again["config"]["threads"] == again["torch_threads"] == m["torch_threads"]


def lorafit_multirun(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", "-m", *overrides, *QUICK,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip


def test_multirun_over_single_target_names_fails_fast_and_exits_nonzero(tmp_path):
    """Hydra reads the comma as a sweep: 4 jobs, each with one bare name as a regex."""
    proc = lorafit_multirun(tmp_path, "lora.target_modules=q_proj,v_proj", "lora.r=4,8")
    assert proc.returncode != 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for job in range(4):
        error = json.loads((sweep / f"{job}/failed.json").read_text())["error"]
        assert "a string is a regex that must match the whole module name" in error, error
        assert "lora.target_modules='[q_proj,v_proj]'" in error
    assert "0 ok, 4 failed" in (sweep / "summary.md").read_text()
    assert "No run of the sweep finished" in proc.stdout + proc.stderr  # Hydra logs to stdout


def test_optuna_records_a_failed_trial_and_goes_on(tmp_path):
    proc = lorafit_multirun(
        tmp_path,
        "+sweep=optuna",
        "hydra.sweeper.n_trials=2",
        "data=jsonl_messages",
        f"data.path={tmp_path / 'missing.jsonl'}",
    )
    assert "Values were told" not in proc.stderr, proc.stderr[-3000:]
    for trial in range(2):  # the second trial ran after the first one failed
        failed = json.loads((tmp_path / f"sweep/{trial}/failed.json").read_text())
        assert "data.path" in failed["error"]
    assert proc.returncode != 0  # no trial finished
