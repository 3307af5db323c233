"""`lorafit train --dry-run`: the figures a run would have, read without weights and without a run
folder; and a typo on the real command line named with the closest key before Hydra starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_runs import save_tiny_smol

LORAFIT = str(Path(sys.executable).with_name("lorafit"))


def lorafit(cwd: Path, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    """`lorafit ARGS` (or `python -m lorafit.train ARGS`) in `cwd`, single-threaded."""
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_OUTPUTS"}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorafit.train", *args] if module else [LORAFIT, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def same_as_build(overrides: list[str]) -> tuple[dict, object, object]:
    """`dry_run(overrides)`'s figures, and the LoRA report and data module that `train.build`
    (the real model, weights loaded) gives for the same config."""
    from lorafit.dryrun import compose_dry, dry_run
    from lorafit.train import build, validate

    figures = dry_run(overrides)
    cfg = compose_dry(overrides)
    *_, report, datamodule = build(cfg, validate(cfg))
    return figures, report, datamodule


def test_dry_run_counts_what_the_real_build_counts(tmp_path, smol_tokenizer, capsys, monkeypatch):
    tiny = save_tiny_smol(tmp_path / "tiny", smol_tokenizer)
    overrides = [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=40",
        "data.batch_size=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=3",
        "lora.r=4",
        "data.micro_batch_tokens=null",  # the first batch whole, as data.batch_size says
    ]
    monkeypatch.chdir(tmp_path)  # the run folder would be made under ./outputs
    figures, report, datamodule = same_as_build(overrides)
    # 2 layers x r=4 x (q, o: 32 + 32; k, v: 32 + 16 in + out features)
    assert figures["trainable_params"] == report.trainable_params == 1792
    assert figures["total_params"] == report.total_params
    assert figures["matched_modules"] == len(report.modules) == 2 * 4  # 2 layers x q, k, v, o
    assert figures["train_examples"] == len(datamodule.train_set) == 40
    assert (figures["micro_batch_size"], figures["accumulate"]) == (4, 2)
    assert figures["steps_per_epoch"] == 5 and figures["total_steps"] == 15  # 40 / 8, 3 epochs
    assert figures["batch_shape"][0] == 4 and figures["batch_shape"][1] <= 256
    assert f"for a 4 x {figures['batch_shape'][1]} micro-batch" in figures["memory"]  # estimate
    out = capsys.readouterr().out
    assert "trainable params: 1,792 of" in out and "5 per epoch, 15 in all" in out
    assert "q_proj x2 (32->32)" in out and "k_proj x2 (32->16)" in out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_dry_run_of_the_default_config_prints_the_run_and_makes_no_folder(tmp_path):
    result = lorafit(tmp_path, "train", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "trainable params: 921,600 of" in out  # 30 layers x r=8 x (2 x 1152 + 2 x 768)
    assert "matched modules: 120: q_proj x30 (576->576), k_proj x30 (576->192)" in out
    assert "808 train, 90 validation" in out
    assert "101 per epoch, 202 in all" in out  # ceil(808 / 8), 2 epochs
    assert "input_ids (2, 256)" in out  # the longest step, cut to 512 positions per micro-batch
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra, no log file


@pytest.mark.slow
def test_dry_run_true_for_the_classification_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    figures, report, datamodule = same_as_build(["experiment=minilm_bbc"])
    assert figures["trainable_params"] == report.trainable_params > 0
    assert figures["matched_modules"] == len(report.modules)
    assert figures["train_examples"] == len(datamodule.train_set)
    result = lorafit(tmp_path, "train", "dry_run=true", "experiment=minilm_bbc")
    assert result.returncode == 0, result.stderr
    assert f"trainable params: {report.trainable_params:,} of" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", [False, True], ids=["lorafit-train", "python-m"])
def test_a_typo_on_the_command_line_names_the_closest_key_before_hydra(tmp_path, module):
    args = ["lora.rnak=8"] if module else ["train", "lora.rnak=8"]
    result = lorafit(tmp_path, *args, module=module)
    assert result.returncode == 1
    assert "lora.rnak is not a config key (did you mean lora.r?)" in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before Hydra made a run folder


def test_a_bad_value_in_a_dry_run_is_one_clear_error(tmp_path):
    result = lorafit(tmp_path, "train", "--dry-run", "lora.lora_dropout=1.5", "lora.r=eight")
    assert result.returncode == 1
    assert "lora.lora_dropout=1.5" in result.stderr and "in [0, 1)" in result.stderr
    assert "lora.r='eight'" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lora", ["none", "pissa", "dora", "all_linear"])
def test_dry_run_counts_every_lora_variant_as_the_build_does(
    tmp_path, smol_tokenizer, monkeypatch, lora
):
    tiny = save_tiny_smol(tmp_path / "tiny", smol_tokenizer)
    monkeypatch.chdir(tmp_path)
    overrides = [f"lora={lora}", "model=hf", f"model.name_or_path={tiny}"]
    figures, report, _ = same_as_build([*overrides, "data.max_train_examples=8"])
    assert figures["trainable_params"] == report.trainable_params > 0
    assert figures["total_params"] == report.total_params
    assert figures["matched_modules"] == len(report.modules)
    if lora == "none":  # full fine-tuning: every weight trains
        assert figures["trainable_params"] == figures["total_params"]
