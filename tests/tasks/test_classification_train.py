"""End to end on MiniLM + BBC News: a few steps write a complete classification run folder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import lorafit_train

pytestmark = pytest.mark.slow

QUICK = [
    "experiment=minilm_bbc",
    "trainer.max_steps=3",
    "data.max_train_examples=48",
    "data.max_length=64",
    "data.eval_batch_size=32",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    proc = lorafit_train(run_dir, *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_folder_metrics_and_confusion_matrix(run_dir):
    for name in [
        "metrics.json",
        "confusion_matrix.png",
        "loss_curve.png",
        "adapter/tokenizer.json",
    ]:
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    # 6 layers x (q, k, v, attention.output.dense: 8*(384+384); intermediate/output.dense:
    # 8*(384+1536)) + pooler.dense 8*(384+384) + classifier head 384*5+5.
    assert m["trainable_params"] == 6 * (4 * 6144 + 2 * 15360) + 6144 + 1925 == 339_845
    assert m["trainable_fraction"] < 0.02 and m["lora_modules"] == 37
    assert m["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(map(sum, m["test_confusion_matrix"])) == 32  # one test batch
    assert set(m["test_f1_per_class"]) == set(m["labels"])
    for key in ["eval_accuracy_before", "eval_accuracy_after", "eval_macro_f1_before"]:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["eval_loss_after"] < m["eval_loss_before"]  # 3 steps at the preset lr already help
    assert m["data"]["examples_read"] == 2225 and m["data"]["decoded_latin1"] == 1
    assert m["data"]["skipped_duplicate"] == 98
    assert m["train_steps"] == 3 and m["task"] == "classification"


def test_adapter_with_head_loads_in_peft_with_equal_logits(run_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from lorafit.adapters import load_adapter
    from lorafit.lora import disable_lora

    cfg = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert "base_model.model.classifier.weight" in load_file(
        run_dir / "adapter/adapter_model.safetensors"
    )
    labels = json.loads((run_dir / "metrics.json").read_text())["labels"]

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            cfg["base_model_name_or_path"], num_labels=len(labels)
        ).eval()

    ours = base()
    load_adapter(ours, run_dir / "adapter")
    ours.eval()  # the injected LoRA layers start in train mode (lora_dropout 0.05)
    theirs = peft.PeftModel.from_pretrained(base(), run_dir / "adapter").eval()
    assert isinstance(theirs, peft.PeftModelForSequenceClassification)
    ids = torch.tensor([[101, 1996, 2924, 3446, 4244, 2011, 2403, 102]])
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(input_ids=ids).logits
        with disable_lora(ours):  # the trained head without the LoRA layers
            c = ours(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-4  # the LoRA layers really change the output


def test_merge_keeps_the_five_label_head(run_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lorafit.merge import merge_to_folder

    report = merge_to_folder([run_dir], tmp_path / "merged")
    assert report["passed"] and report["max_abs_diff"] < 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    labels = json.loads((run_dir / "metrics.json").read_text())["labels"]
    assert [merged.config.id2label[i] for i in range(5)] == labels
    assert merged.classifier.weight.shape == (5, 384)
    head = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert torch.equal(merged.classifier.weight, head["base_model.model.classifier.weight"])


def test_generate_refuses_a_classifier(run_dir):
    from lorafit.generate import load_for_generation

    with pytest.raises(ValueError, match="SEQ_CLS adapter .* needs a causal-LM run"):
        load_for_generation(str(run_dir))


def test_missing_column_is_a_clear_error(tmp_path):
    data = tmp_path / "news.csv"
    data.write_text("body,topic\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    run_dir = tmp_path / "bad"
    proc = lorafit_train(run_dir, *QUICK, "data=csv_classification", f"data.path={data}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no column 'text' (data.text_column)" in proc.stderr and "'body'" in proc.stderr
    assert not (run_dir / "metrics.json").exists()
