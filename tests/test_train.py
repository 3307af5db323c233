"""End to end on the real built-in model and data: a few training steps write a whole run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

QUICK = [
    "trainer.max_steps=5",
    "trainer.limit_val_batches=2",
    "data.max_train_examples=64",
    "samples.num_prompts=2",
    "samples.max_new_tokens=8",
    "eval.general_docs=16",
]


def lorafit_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run `python -m lorafit.train` as a user would, from an unrelated working directory."""
    return subprocess.run(
        [sys.executable, "-m", "lorafit.train", f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = lorafit_train(run_dir, *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_folder_is_complete(run_dir):
    for name in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "metrics.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/lorafit.json",
        "loss_curve.png",
        "samples.jsonl",
        "checkpoints/last.ckpt",
    ]:
        assert (run_dir / name).is_file(), name
    # one last.ckpt: no `last-v1.ckpt` from Lightning's own end-of-fit save beside it
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in [
        "task",
        "model",
        "dataset",
        "lora_r",
        "lora_alpha",
        "target_modules",
        "trainable_params",
        "total_params",
        "trainable_fraction",
        "adapter_bytes",
        "eval_loss_before",
        "eval_loss_after",
        "train_tokens_per_s",
        "train_seconds",
        "peak_rss_mb",
        "seed",
        "git_commit",
        "versions",
    ]:
        assert key in m, key
    # 30 layers x 4 projections; q,o: 8*(576+576); k,v: 8*(576+192).
    assert m["trainable_params"] == 30 * (2 * 8 * 1152 + 2 * 8 * 768) == 921_600
    assert m["trainable_fraction"] < 0.01
    assert m["train_steps"] == 5
    assert m["eval_loss_after"] < m["eval_loss_before"]  # 5 steps at lr 1e-3 already help
    assert m["train_tokens_per_s"] > 0
    tensors = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert len(tensors) == 240
    assert m["adapter_bytes"] == (run_dir / "adapter/adapter_model.safetensors").stat().st_size
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(
        {"prompt", "base", "tuned", "reference"} <= r.keys() for r in rows
    )


def test_checkpoint_holds_only_lora_weights_and_resumes(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert len(keys) == 240 and all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    resumed = tmp_path / "resumed"
    overrides = [o for o in QUICK if not o.startswith("trainer.max_steps")]
    proc = lorafit_train(
        resumed,
        *overrides,
        "trainer.max_steps=7",
        "trainer.max_epochs=3",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["train_steps"] == 7


def test_adapter_loads_in_peft_with_equal_logits(run_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorafit.adapters import load_adapter

    cfg = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    base_dir = cfg["base_model_name_or_path"]
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30, 2, 198, 1, 520]])
    ours = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    load_adapter(ours, run_dir / "adapter")
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run_dir / "adapter"
    )
    with torch.no_grad():
        a = ours.eval()(ids).logits
        b = theirs.eval()(ids).logits
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            c = base(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # the trained adapter really changes the output


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.r=0", "lora.r"),
        ("lora.lora_alpha=-1", "lora.lora_alpha"),
        ("lora.target_modules=[qproj]", "q_proj"),
        ("data=jsonl_messages data.path=/nonexistent.jsonl", "data.path"),
        ("model=hf model.name_or_path=/nonexistent/model", "model.name_or_path"),
    ],
)
def test_bad_input_gives_clear_error_and_no_complete_run_folder(tmp_path, override, needle):
    run_dir = tmp_path / "bad"
    proc = lorafit_train(run_dir, *override.split(), *QUICK)
    assert proc.returncode != 0
    assert "lorafit: error:" in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "failed"


def test_rows_lacking_the_formats_field_are_named_not_blamed_on_the_split(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [json.dumps({"prompt": f"q{i}", "answer": "a"}) for i in range(20)]
    data.write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    proc = lorafit_train(run_dir, "data=file", f"data.path={data}", "data.format=prompt_completion")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "skipped_missing_" in proc.stderr and "data.format" in proc.stderr
    assert "val_fraction" not in proc.stderr


def test_build_leaves_the_model_in_train_mode_with_lora_dropout(tmp_path):
    """Lightning keeps each module's mode; from_pretrained's eval mode would switch dropout off."""
    from hydra import compose, initialize_config_dir

    from lorafit.config import CONF_DIR
    from lorafit.lora import lora_modules
    from lorafit.tasks.causal_lm import CausalLMModule
    from lorafit.train import build

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data.max_train_examples=8",
                "samples.num_prompts=0",
                "lora.lora_dropout=0.05",
            ],
        )
    model, *_ = build(cfg, CausalLMModule)
    assert all(m.training for m in model.modules())
    _, layer = next(lora_modules(model))
    assert isinstance(layer.lora_dropout, torch.nn.Dropout) and layer.lora_dropout.p == 0.05
