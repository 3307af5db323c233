"""`lorafit estimate`: exact parameter counts from configs alone, memory parts that follow the
options, and (slow) the estimate against the peak RSS a real short run measures."""

import json
import os
import subprocess
import sys

import pytest

from lorafit.cli import main
from lorafit.estimate import estimate

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


@pytest.fixture
def llama2(tmp_path) -> str:
    path = tmp_path / "llama-2-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA2_7B))
    return str(path)


def test_llama2_7b_r8_on_qkvo_has_8388608_trainable_params(llama2, capsys):
    assert main(["estimate", llama2, "lora.r=8"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 8,388,608 in 128 LoRA modules" in out
    assert "frozen params:    6,738,415,616" in out  # Llama-2-7B's published size
    e = estimate([llama2, "--json"])
    assert e["trainable_params"] == 32 * 4 * 8 * (4096 + 4096)
    assert e["adapter_bytes"] > 4 * e["trainable_params"]  # float32 + the safetensors header


def test_memory_follows_the_options(llama2):
    whole = "data.micro_batch_tokens=null"  # the 8 x 256 micro-batch uncut
    base = estimate([llama2, whole])
    ckpt = estimate([llama2, whole, "model.gradient_checkpointing=true"])
    half = estimate([llama2, whole, "data.batch_size=4"])
    bf16 = estimate([llama2, whole, "model.dtype=bfloat16"])
    r16 = estimate([llama2, whole, "lora.r=16"])
    cut = estimate([llama2, "data.micro_batch_tokens=1024"])  # 2 micro-batches of 4 x 256
    parts = base["memory_parts_mb"]
    act = "activations saved for backward"
    assert cut["memory_parts_mb"][act] == pytest.approx(parts[act] / 2, rel=0.01)
    assert cut["flops_per_step"] == pytest.approx(base["flops_per_step"], rel=0.01)
    assert ckpt["memory_parts_mb"][act] < parts[act] / 5  # 32 layer inputs + one layer
    assert ckpt["memory_parts_mb"]["frozen weights"] == parts["frozen weights"]
    assert half["memory_parts_mb"][act] == pytest.approx(parts[act] / 2, rel=0.01)
    assert bf16["memory_parts_mb"]["frozen weights"] == pytest.approx(parts["frozen weights"] / 2)
    assert bf16["memory_parts_mb"]["bf16 weight copies (autocast)"] == 0  # already bf16
    assert r16["trainable_params"] == 2 * base["trainable_params"]
    assert ckpt["flops_per_step"] > base["flops_per_step"]  # the recomputed forward


def test_builtins_count_as_a_run_does():
    """The counts metrics.json of a default run records (no weights read here)."""
    smol = estimate(["smollm2_135m"])
    assert (smol["trainable_params"], smol["total_params"]) == (921_600, 135_436_608)
    assert smol["adapter_bytes"] == 3_717_656
    mini = estimate(["experiment=minilm_bbc"])
    assert (mini["trainable_params"], mini["total_params"]) == (339_845, 23_053_061)


def test_bad_model_and_bad_key_are_one_clear_error(capsys):
    assert main(["estimate", "no_such_model"]) == 1
    assert "not a built-in model" in capsys.readouterr().err
    assert main(["estimate", "lora.rnak=8"]) == 1
    assert "lora.r" in capsys.readouterr().err


def test_imports_baseline_constant_is_current():
    """IMPORTS_MB (part of BASELINE_MB) re-measured: RSS of a process that imports a run's code."""
    from lorafit.estimate import IMPORTS_MB

    code = "import lorafit.train, psutil; print(psutil.Process().memory_info().rss / 2**20)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rss = float(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert rss == pytest.approx(IMPORTS_MB, rel=0.25)


CALIBRATION = {  # 3 optimizer steps of each built-in's default run, small evaluations
    "smollm2_135m": ["trainer.max_steps=3", "samples.num_prompts=0", "trainer.limit_val_batches=2"],
    "minilm_bbc": [
        "experiment=minilm_bbc",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CALIBRATION)
def test_estimate_is_within_25_percent_of_the_measured_peak(name, tmp_path):
    overrides = CALIBRATION[name]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit.train", f"hydra.run.dir={run_dir}", "threads=1",
         *overrides],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads((run_dir / "metrics.json").read_text())
    assert measured["peak_rss_scope"].endswith("model load")
    predicted = estimate(overrides)["peak_mb"]
    print(f"{name}: estimate {predicted:.0f} MiB, measured {measured['peak_rss_mb']:.0f} MiB")
    assert predicted == pytest.approx(measured["peak_rss_mb"], rel=0.25)
