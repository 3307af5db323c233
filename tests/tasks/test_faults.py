"""Training faults: a run killed (SIGKILL), stopped with Ctrl-C (SIGINT) or preempted (SIGTERM) at a
random step and resumed with `lorafit train resume=RUN_DIR` ends with the uninterrupted run's
adapter; a non-finite step stops the run naming the step, its examples and the last checkpoint, or
is skipped and counted; a checkpoint write that fails leaves the previous checkpoint whole."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafit.artifacts import read_logged
from tiny_runs import EXACT, adapter, save_tiny_smol, train_run

pytestmark = pytest.mark.slow

LORAFIT = str(Path(sys.executable).with_name("lorafit"))
TESTS = str(Path(__file__).parents[1])
STEPS = 8


def lorafit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": TESTS}
    return subprocess.run(
        [LORAFIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_smol(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer)


def run_args(tiny: Path) -> list[str]:
    """8 steps of 2 over 16 conversations (2 epochs), the default cosine schedule, a checkpoint
    every step; float32 and no dropout, so that equal runs are equal to the last bit."""
    return [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=16",
        "data.batch_size=2",
        f"trainer.max_steps={STEPS}",
        "trainer.limit_val_batches=1",
        "eval.general_text=null",
        "+callbacks.checkpoint.every_n_train_steps=1",
        *EXACT,
    ]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = lorafit("train", f"hydra.run.dir={run}", *run_args(tiny), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=str)
def test_interrupted_run_resumes_to_the_uninterrupted_adapter(tiny, straight, tmp_path, sig):
    step = random.randint(1, STEPS - 2)  # the signal comes inside step `step + 1`
    run = tmp_path / "run"
    proc = lorafit(
        "train", f"hydra.run.dir={run}", *run_args(tiny),
        "+callbacks.kill._target_=tiny_runs.SignalAt", f"+callbacks.kill.step={step}",
        f"+callbacks.kill.signum={int(sig)}", cwd=tmp_path,
    )  # fmt: skip
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"]
    assert not (run / "metrics.json").exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert saved == step, f"killed in step {step + 1}"
    else:  # the step in progress finishes, is saved, and the run stops
        assert proc.returncode == 128 + sig, proc.stderr[-3000:]
        status = json.loads((run / "interrupted.json").read_text())
        assert status["status"] == "interrupted" and status["signal"] == sig.name
        assert status["step"] == saved == step + 1
        assert f"resume={run}" in proc.stderr
    proc = lorafit("train", f"resume={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == STEPS
    assert not (run / "interrupted.json").exists()  # the finished folder says only that
    a, b = adapter(straight), adapter(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, f"signal in step {step + 1}"
    if sig != signal.SIGKILL:  # the loss logged before the stop is kept (a kill loses it)
        for key in ("train/loss", "val/loss"):
            assert read_logged(run / "csv/metrics.csv", key) == read_logged(
                straight / "csv/metrics.csv", key
            )


def test_resume_refuses_what_cannot_resume(straight, tmp_path):
    proc = lorafit("train", f"resume={straight}", cwd=tmp_path)
    assert proc.returncode == 1 and "finished" in proc.stderr
    proc = lorafit("train", f"resume={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1 and "not a run folder" in proc.stderr


def poison_step(monkeypatch, at: int) -> None:
    """The causal-LM loss becomes NaN once, in optimizer step `at + 1`."""
    from lorafit.tasks.causal_lm import CausalLMModule

    original, done = CausalLMModule.summed_loss, []

    def summed_loss(self, batch):
        loss = original(self, batch)
        if self.trainer.training and self.trainer.global_step == at and not done:
            done.append(1)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(CausalLMModule, "summed_loss", summed_loss)


def test_a_nonfinite_step_stops_the_run_naming_step_examples_and_checkpoint(
    tiny, tmp_path, monkeypatch
):
    from lorafit.tasks.faults import NonFiniteError

    poison_step(monkeypatch, at=2)
    with pytest.raises(NonFiniteError) as error:
        train_run(tmp_path / "run", *run_args(tiny))
    message = str(error.value)
    assert "Non-finite training step 3: loss nan" in message
    assert "examples [" in message and "last.ckpt (step 2)" in message
    assert "trainer.skip_nonfinite_batches" in message
    assert (
        torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["global_step"] == 2
    )


def test_skipped_nonfinite_steps_are_counted_and_change_nothing(tiny, tmp_path, monkeypatch):
    poison_step(monkeypatch, at=2)
    metrics = train_run(tmp_path / "run", *run_args(tiny), "trainer.skip_nonfinite_batches=1")
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["train_steps"] == STEPS
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "run").values())


def test_a_failed_checkpoint_write_leaves_the_previous_one(tiny, tmp_path, monkeypatch):
    from lorafit.tasks import faults

    real, calls = faults.atomic_write, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint: disk full
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(faults, "atomic_write", failing)
    with pytest.raises(OSError, match="No space left"):
        train_run(tmp_path / "run", *run_args(tiny))
    ckpt = tmp_path / "run/checkpoints"
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 2
    assert [p.name for p in ckpt.iterdir()] == ["last.ckpt"]  # no temp file left
