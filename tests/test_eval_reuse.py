"""No repeated evaluation: the metrics before training are cached by base model + data (a sweep
over rank computes them once), and the fit's last validation is the after-training one when it
ran on the final weights."""

import csv
from pathlib import Path

import pytest

from lorafit.tasks.evaluation import RunEvaluation
from tiny_runs import EXACT, save_tiny_smol, train_run


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_smol(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer)


@pytest.fixture
def validations(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    calls = []
    original = RunEvaluation.validate

    def counted(self):
        calls.append(self.trainer.global_step)
        return original(self)

    monkeypatch.setattr(RunEvaluation, "validate", counted)
    return calls


def common(tiny: Path) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=16",
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=2",
        "eval.general_text=null",
        *EXACT,
    ]


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    rows = csv.DictReader((run / "csv/metrics.csv").open())
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_a_sweep_computes_the_before_metrics_once(tiny, tmp_path, validations):
    a = train_run(tmp_path / "a", *common(tiny), "lora.r=4")
    assert validations == [0] and not a["eval_before_cached"]  # after: the fit's own validation
    b = train_run(tmp_path / "b", *common(tiny), "lora.r=8", "lora.lora_alpha=32")
    assert validations == [0] and b["eval_before_cached"]  # nothing validated again
    assert b["eval_loss_before"] == a["eval_loss_before"]
    assert logged(tmp_path / "b", "val/loss")[0] == (0, b["eval_loss_before"])  # still logged
    c = train_run(tmp_path / "c", *common(tiny), "lora.r=4", "eval.cache_before=false")
    assert validations == [0, 0] and not c["eval_before_cached"]
    assert c["eval_loss_before"] == pytest.approx(a["eval_loss_before"], rel=1e-6)
    other_data = train_run(tmp_path / "d", *common(tiny), "data.val_fraction=0.2")
    assert not other_data["eval_before_cached"]


def test_after_metrics_reuse_the_last_validation_only_at_the_final_step(tiny, tmp_path,
                                                                        validations):  # fmt: skip
    a = train_run(tmp_path / "a", *common(tiny), "eval.cache_before=false")
    steps = a["train_steps"]
    assert validations == [0]  # the epoch's validation ran at the last step: reused
    assert logged(tmp_path / "a", "val/loss")[-1][1] == a["eval_loss_after"] and steps == 4
    validations.clear()
    b = train_run(tmp_path / "b", *common(tiny), "eval.cache_before=false", "trainer.max_steps=2")
    assert validations == [0, 2]  # stopped inside the epoch: no validation at step 2 in the fit
    assert b["train_steps"] == 2
