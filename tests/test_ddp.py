"""Several processes under DDP (gloo, on CPU) give one process's numbers: the same optimizer steps,
the same adapter, the same eval_loss; one run folder, written by rank 0 alone; started from the
`lorafit` console script as documented, in a run and in a multirun; a kill and a resume lose
nothing; a LoRA target that never reaches the loss is a named error, not a hang."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_runs import EXACT, adapter, save_tiny_smol

pytestmark = pytest.mark.slow

LORAFIT = str(Path(sys.executable).with_name("lorafit"))
TESTS = str(Path(__file__).parent)


def lorafit(*args: str, cwd: Path, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    """The console script, as a user runs it, from `cwd`; tests/ importable (for KillAt)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": TESTS}
    return subprocess.run(
        [LORAFIT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
        **kwargs,
    )  # fmt: skip


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_smol(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer)


def tiny_args(tiny: Path) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=16",
        "trainer.limit_val_batches=1",
        "scheduler=constant",
        "eval.general_text=null",
        *EXACT,
    ]


def test_ddp_cpu_equals_one_process_on_the_default_job(tmp_path):
    """The issue's check on the real SmolLM2 and conversations: 2 processes x batch 8 against one
    process x batch 16, 6 steps, float32, dropout 0."""
    common = ["trainer.max_steps=6", "lora.lora_dropout=0", "trainer.precision=32"]
    common += ["model.dtype=float32"]  # the built-in's default frozen dtype is bfloat16
    common += ["samples.num_prompts=0", "callbacks=none", "eval.general_docs=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = lorafit("train", f"hydra.run.dir={one}", *common, "data.batch_size=16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = lorafit("train", "trainer=ddp_cpu", f"hydra.run.dir={two}", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["micro_batch_size"] == 8
    assert m1["global_batch_size"] == m2["global_batch_size"] == 16
    assert m1["train_steps"] == m2["train_steps"] == 6
    assert m1["train_tokens"] == m2["train_tokens"]  # summed over both ranks
    assert abs(m1["eval_loss_before"] - m2["eval_loss_before"]) < 1e-5
    assert abs(m1["eval_loss_after"] - m2["eval_loss_after"]) < 1e-5
    assert abs(m1["general_loss_after"] - m2["general_loss_after"]) < 1e-5
    assert m1["eval_loss_after"] < m1["eval_loss_before"] - 0.05  # it trained
    assert max_diff(adapter(one), adapter(two)) < 1e-4
    # one run folder, the same files as one process's: rank 1 wrote nothing
    assert files(one) == files(two)
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.log"))


def test_global_batch_size_fixes_the_step_for_any_device_count(tiny, tmp_path):
    """data.global_batch_size=8: 1 process (micro 4 x 2) and 2 processes (4 each) take the same
    steps; the log names the shape."""
    args = [*tiny_args(tiny), "trainer.max_steps=2", "data.global_batch_size=8"]
    args += ["data.batch_size=4", "callbacks=none"]
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = lorafit("train", f"hydra.run.dir={one}", *args, cwd=tmp_path)
    p2 = lorafit("train", "trainer=ddp_cpu", f"hydra.run.dir={two}", *args, cwd=tmp_path)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert (m1["micro_batch_size"], m1["accumulate_grad_batches"], m1["world_size"]) == (4, 2, 1)
    assert (m2["micro_batch_size"], m2["accumulate_grad_batches"], m2["world_size"]) == (4, 1, 2)
    assert m1["global_batch_size"] == m2["global_batch_size"] == 8
    assert "One optimizer step: 8 example(s)" in p2.stdout + p2.stderr
    assert max_diff(adapter(one), adapter(two)) < 1e-6


def test_ddp_inside_a_multirun_writes_each_job_into_its_sweep_folder(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    proc = lorafit(
        "train", "-m", "trainer=ddp_cpu", *tiny_args(tiny), "trainer.max_steps=1",
        "callbacks=none", "lora.r=2,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, r in (("0", 2), ("1", 4)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["lora_r"] == r and metrics["world_size"] == 2
    assert not (tmp_path / "outputs").exists()  # no rank wrote into hydra.run.dir


def test_ddp_killed_after_step_3_resumes_to_the_uninterrupted_adapter(tiny, tmp_path):
    args = [*tiny_args(tiny), "trainer=ddp_cpu", "trainer.max_steps=6", "data.batch_size=2"]
    args += ["+callbacks.checkpoint.every_n_train_steps=1"]
    straight, killed, resumed = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"
    proc = lorafit("train", f"hydra.run.dir={straight}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = lorafit(
        "train", f"hydra.run.dir={killed}", *args, "+callbacks.kill._target_=tiny_runs.SignalAt",
        "+callbacks.kill.step=3", "+callbacks.kill.signum=9", "+callbacks.kill.group=true",
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    last = killed / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert not (killed / "metrics.json").exists()
    time.sleep(1)  # the killed group's port is free again
    proc = lorafit("train", f"hydra.run.dir={resumed}", *args, f"ckpt_path={last}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["train_steps"] == 6
    assert max_diff(adapter(straight), adapter(resumed)) < 1e-6


def test_a_target_that_never_reaches_the_loss_is_named_under_ddp(tmp_path):
    """A tiny BERT decoder with cross-attention layers that a classifier never feeds: LoRA on every
    `query` reaches `crossattention.self.query`, which gets no gradient."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from conftest import TINY_BERT

    config = BertConfig(
        **{**TINY_BERT, "vocab_size": 30522, "max_position_embeddings": 512},
        is_decoder=True, add_cross_attention=True, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    from lorafit.models import builtin_model, resolve_model_dir

    minilm = resolve_model_dir(builtin_model("minilm_l6"))
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp_path / "bert")
    proc = lorafit(
        "train", "experiment=minilm_bbc", "trainer=ddp_cpu", "model=hf",
        f"model.name_or_path={tmp_path / 'bert'}", "lora.target_modules=[query]",
        "data.max_train_examples=32", "data.max_length=32", "trainer.max_steps=2",
        "callbacks=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "crossattention.self.query" in err and "find_unused_parameters=true" in err


def test_classification_under_ddp_finishes_with_its_test_metrics(tmp_path):
    """after_fit's trainer.test needs every rank: run on rank 0 alone it would hang."""
    run = tmp_path / "run"
    proc = lorafit(
        "train", "experiment=minilm_bbc", "trainer=ddp_cpu", "trainer.max_steps=6",
        "callbacks=none", f"hydra.run.dir={run}", cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 6
    assert 0.2 < metrics["test_accuracy"] <= 1 and len(metrics["test_f1_per_class"]) == 5
    assert sum(map(sum, metrics["test_confusion_matrix"])) == 213  # each test article once
    assert (run / "confusion_matrix.png").is_file()
