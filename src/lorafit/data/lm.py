"""Causal-LM data module: a data set -> messages or text -> tokenized, masked train/val batches.

Reading is `lorafit.data.sources`, row formats `lorafit.data.formats`, rendering, masking and
chunking `lorafit.data.encoding`, packing `lorafit.data.packing`. Tokenization (the built-in
chatterbot corpus too) is a `datasets.map` cached by data fingerprint, tokenizer and encoding
options (`lorafit.data.tokenized`), so running the same data again reads it back.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader

from lorafit.config import plain
from lorafit.data.encoding import (
    ENCODING_VERSION,
    FEATURES,
    encode_chat_row,
    encode_text_batch,
    lm_collator,
    resolve_template,
    tokenizer_fingerprint,
)
from lorafit.data.formats import (
    FORMATS,
    DataError,
    Message,
    RowError,
    detect_format,
    held_out_prompts,
    make_converter,
)
from lorafit.data.packing import packed_collator
from lorafit.data.reader import Locator, SkipLog
from lorafit.data.sampling import (
    StepLoader,
    StepSampler,
    StreamSteps,
    device_share,
    eval_loader,
    split_stream,
)
from lorafit.data.sources import Read, load_chatterbot, read_splits
from lorafit.data.tokenized import (
    ROW,
    TRUNCATED_AWAY,
    cached_map,
    check_cut_answers,
    check_not_empty,
    keep_usable,
    log_padding,
    numbered,
)

log = logging.getLogger(__name__)


class ChatDataModule(L.LightningDataModule):
    """A data set -> masked, tokenized train/validation batches for causal-LM fine-tuning.

    Args:
        tokenizer: a fast Hugging Face tokenizer (character offsets are needed for masking). For
            chat formats its `chat_template` is set to the template used, so the adapter folder's
            tokenizer files (saved after setup) carry it.
        source: `chatterbot` (the built-in corpus) or `datasets` (`data.path` read by
            `datasets.load_dataset`; `jsonl` is accepted as its old name).
        path: a local file, folder or glob (json, jsonl, csv, tsv, parquet, arrow, txt), a folder
            from `save_to_disk`, a `datasets` builder name with `data_files`, or a hub id.
        language: chatterbot corpus language folder.
        format: `auto` (detected from the columns and logged), or one of `lorafit.formats.FORMATS`.
        columns: for `format: columns`, internal field -> nested row path (see `make_converter`).
        split: the training split; `val_split` the validation one (default: `validation`,
            `valid` or `val` when present, else `val_fraction` of `split`, held out by `seed`).
        data_files, revision, subset: passed to `datasets.load_dataset` (`subset` is its `name`).
        streaming: read lazily (files larger than memory); no tokenization cache, and the
            validation rows are the first `val_examples` (default 200) of the stream.
        encoding, encoding_errors: how local files are decoded (`lorafit.data.reader`): bytes
            not valid in `encoding` are an error naming file, line and byte offset, unless
            `encoding_errors` (`replace`, `ignore`, ...) decodes them (the lines are counted).
        template: None (the tokenizer's own; an error when it has none), `chatml`, `alpaca` or
            a Jinja template.
        max_length: tokens per chat example; longer ones are truncated and counted. A row whose
            whole answer is cut away is skipped and named in a warning (rows numbered from 1 in
            file order); an error when that leaves a split empty.
        block_size: tokens per `text` chunk (default `max_length`); `stride` of them overlap.
        keep_document_boundaries: chunk each document on its own (short tails kept) instead of
            concatenating documents with eos between them (tails dropped and counted).
        val_fraction: share of rows held out when no validation split exists; `val_examples`,
            when set, is a count instead.
        batch_size: training examples per batch (per device); `eval_batch_size` for validation.
        global_batch_size: examples per optimizer step over all devices and micro-batches;
            `batch_size` is then the largest micro-batch (`lorafit.distributed.step_shape`).
        packing: pack training micro-batches into rows of `max_length` (`lorafit.data.packing`).
        micro_batch_tokens: padded positions per training micro-batch at most: a longer step is
            cut into more micro-batches, same examples and loss (`StepSampler`); None: no cut.
        train_on_prompt: put labels on prompt tokens too (default: assistant turns only).
        train_on_all_assistant_turns: label every assistant turn (False: only the last one).
        max_train_examples: cap the training split (after the split), e.g. for quick runs.
        num_samples: held-out prompts kept for the base-vs-tuned `samples.jsonl`.
        num_workers: DataLoader workers; `num_proc` processes for tokenizing (`datasets.map`).
        cache_dir: where tokenized splits are cached (default: the datasets cache).
        seed: split and shuffle seed.
    """

    task = "causal_lm"  # the task module it feeds (checked against the `task` config group)

    def __init__(
        self,
        tokenizer,
        source: str = "chatterbot",
        path: str | None = None,
        language: str = "english",
        format: str = "auto",
        columns: dict[str, str] | None = None,
        split: str = "train",
        val_split: str | None = None,
        data_files: Any = None,
        revision: str | None = None,
        subset: str | None = None,
        streaming: bool = False,
        encoding: str = "utf-8",
        encoding_errors: str | None = None,
        template: str | None = None,
        max_length: int = 256,
        block_size: int | None = None,
        stride: int = 0,
        keep_document_boundaries: bool = False,
        val_fraction: float = 0.05,
        val_examples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        global_batch_size: int | None = None,
        packing: bool = False,
        micro_batch_tokens: int | None = None,
        train_on_prompt: bool = False,
        train_on_all_assistant_turns: bool = True,
        max_train_examples: int | None = None,
        num_samples: int = 5,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1.")
        if format != "auto" and format not in FORMATS:
            raise DataError(f"data.format='{format}' is unknown; use auto or one of {FORMATS}.")
        self.block_size = block_size or max_length
        if not 0 <= stride < self.block_size:
            raise DataError(f"data.stride={stride} must be >= 0 and below data.block_size.")
        self.tokenizer = tokenizer
        self.source, self.path, self.language, self.format = source, path, language, format
        self.columns, self.data_files = plain(columns), plain(data_files)
        self.split, self.val_split, self.revision, self.subset = split, val_split, revision, subset
        self.streaming, self.template, self.encoding = streaming, template, encoding
        self.encoding_errors, self.max_length, self.stride = encoding_errors, max_length, stride
        self.keep_document_boundaries = keep_document_boundaries
        self.val_fraction, self.val_examples, self.seed = val_fraction, val_examples, seed
        self.batch_size, self.eval_batch_size, self.packing = batch_size, eval_batch_size, packing
        self.micro_batch_tokens = micro_batch_tokens
        self.global_batch_size, self.train_on_prompt = global_batch_size, train_on_prompt
        self.train_on_all_assistant_turns = train_on_all_assistant_turns
        self.max_train_examples, self.num_samples = max_train_examples, num_samples
        self.num_workers, self.num_proc, self.cache_dir = num_workers, num_proc, cache_dir
        self.stats: dict[str, Any] = {}
        self.sample_prompts: list[tuple[list[Message], str]] = []
        self.train_set = None

    # -- reading and splitting --------------------------------------------------------------------

    def load_raw(self) -> tuple[Read, Counter, str]:
        """(what was read, rows skipped before the dataset was built, data set name)."""
        if self.source == "chatterbot":
            convs, skipped = load_chatterbot(self.language)
            rows = datasets.Dataset.from_list([{"messages": c} for c in convs])
            name = f"chatterbot/{self.language}"
            where = f"{name} (conversations numbered after repeats were removed)"
            return Read({"train": rows}, {"train": Locator([], len(rows), where)}), skipped, name
        if self.source in ("datasets", "jsonl"):
            if not self.path:
                raise DataError(
                    "data.path is not set; give a file, folder, glob or hub id: "
                    "lorafit train data=file data.path=/path/to/data.jsonl"
                )
            read = read_splits(
                self.path, self.data_files, self.revision, self.subset, self.streaming,
                encoding=self.encoding, encoding_errors=self.encoding_errors,
                cache_dir=self.cache_dir,
            )  # fmt: skip
            return read, Counter(), self.path
        raise DataError(f"data.source='{self.source}' is unknown; use 'chatterbot' or 'datasets'.")

    def where(self) -> str:
        """The data, as messages name it: the config keys that chose it."""
        if self.source == "chatterbot":
            return f"chatterbot/{self.language}"
        files = f" data.data_files={self.data_files}" if self.data_files else ""
        return f"data.path='{self.path}'{files}"

    def split_rows(self, splits) -> tuple[Any, Any]:
        """(train rows, validation rows): a validation split if there is one, else a seeded split.

        Raises:
            DataError: `split`/`val_split` not among the splits, or too few rows to split.
        """
        for name in (self.split, self.val_split):
            if name is not None and name not in splits:
                raise DataError(f"data split '{name}' not found; the data has {list(splits)}.")
        train = numbered(splits[self.split])
        val_name = self.val_split or next(
            (s for s in ("validation", "valid", "val") if s in splits), None
        )
        self.split_names = (self.split, val_name)  # val_name None: validation cut from `split`
        n_val = self.val_examples or 200  # the rows a stream holds out (it has no length)
        if val_name:
            val = numbered(splits[val_name])
        elif self.streaming:  # hold out the stream's first rows
            val, train = train, train.skip(n_val)
        else:
            if len(train) < 2:
                where = f"{self.where()}: split '{self.split}'"
                raise DataError(f"{where} has {len(train)} rows: too few to hold any out.")
            parts = train.train_test_split(
                test_size=self.val_examples or self.val_fraction, seed=self.seed
            )
            train, val = parts["train"], parts["test"]
        if self.streaming:  # evaluation needs a sized set: the validation stream's first rows
            val = datasets.Dataset.from_list(list(val.take(n_val)))
        self.rows_read = None if self.streaming else len(train) + len(val)  # before the cap
        if self.max_train_examples:
            n = self.max_train_examples
            train = train.take(n) if self.streaming else train.select(range(min(n, len(train))))
        return train, val

    def detect(self, rows) -> str:
        """The row format: `data.format`, or the detected one (logged) for `auto`."""
        if self.format != "auto":
            return self.format
        first = {k: v for k, v in next(iter(rows), {}).items() if k != ROW}
        columns = [c for c in rows.column_names or first if c != ROW]
        fmt = "columns" if self.columns else detect_format(columns, first, self.where())
        log.info("data.format=auto: detected '%s' from columns %s", fmt, columns)
        return fmt

    # -- tokenizing -------------------------------------------------------------------------------

    def tokenize(self, rows, convert, is_text: bool, split: str) -> tuple[Any, str | None, bool]:
        """Map rows to the `FEATURES` columns, cached by data fingerprint + tokenizer + options.

        Returns:
            (tokenized rows, cache key or None when streaming, whether it came from the cache).
        """
        if is_text:
            fn = partial(
                encode_text_batch,
                convert=convert,
                tokenizer=self.tokenizer,
                block_size=self.block_size,
                stride=self.stride,
                keep_boundaries=self.keep_document_boundaries,
                row_key=ROW,
            )
        else:
            fn = partial(
                encode_chat_row,
                convert=convert,
                tokenizer=self.tokenizer,
                max_length=self.max_length,
                row_key=ROW,
                train_on_prompt=self.train_on_prompt,
                train_on_all_assistant_turns=self.train_on_all_assistant_turns,
            )
        remove = rows.column_names or list(next(iter(rows)))
        if self.streaming and isinstance(rows, datasets.IterableDataset):
            out = rows.map(fn, batched=is_text, remove_columns=remove, features=FEATURES)
            return out.filter(lambda s: s == "", input_columns="skip"), None, False
        options = [
            ENCODING_VERSION,
            tokenizer_fingerprint(self.tokenizer),
            self.format,
            self.columns,
            is_text,
            self.max_length,
            self.train_on_prompt,
            self.train_on_all_assistant_turns,
            self.block_size,
            self.stride,
            self.keep_document_boundaries,
        ]
        try:
            return cached_map(
                rows, fn, is_text, remove, options, self.cache_dir, self.num_proc, split
            )
        except RowError as e:  # a row that cannot be encoded: name its file and line
            where = self.locators[self.source_split(split)].name(e.args[0])
            raise DataError(f"{self.where()}: {where}: {e.args[1]}") from None

    def source_split(self, split: str) -> str:
        """The split of the data that a `train` / `val` split's rows (and numbers) come from."""
        return self.split if split == "train" else self.split_names[1] or self.split

    # -- Lightning hooks --------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        log_padding(self.tokenizer)
        read, skipped, name = self.load_raw()
        self.locators = read.locators
        train_rows, val_rows = self.split_rows(read.splits)
        fmt = self.detect(train_rows)
        convert = make_converter(fmt, self.columns)
        is_text = fmt == "text" or (fmt == "columns" and "text" in (self.columns or {}))
        template = None
        if not is_text:
            template, self.tokenizer.chat_template = resolve_template(self.tokenizer, self.template)
        self.format = fmt  # part of the cache key; `auto` resolved
        skips, counts = SkipLog(), Counter(read.counts)
        for reason, n in skipped.items():
            skips.add(reason, n=n)
        train, train_key, train_hit = self.tokenize(train_rows, convert, is_text, "train")
        val, val_key, val_hit = self.tokenize(val_rows, convert, is_text, "val")
        located = {s: self.locators[self.source_split(s)] for s in ("train", "val")}
        self.val_set = keep_usable(val, counts, skips, located["val"])
        self.val_set = self.val_set.select_columns(["input_ids", "labels"])
        self.sample_prompts = (
            [] if is_text else held_out_prompts(val_rows, convert, self.num_samples)
        )
        self.stats = {"dataset": name, "format": fmt, "template": template}
        if self.streaming:
            self.train_set = train.select_columns(["input_ids", "labels"])
            if next(iter(self.train_set.take(1)), None) is None:
                raise DataError(
                    "data.streaming: no usable training row is left after the first "
                    f"{len(val_rows)} rows went to validation; set data.val_examples lower or "
                    "give a validation split (data.val_split / data.data_files)."
                )
            self.stats |= {"streaming": True, "val_examples": len(self.val_set)}
            log.info("Data (streaming; training rows are counted as they are read): %s", self.stats)
            return
        usable = keep_usable(train, counts, skips, located["train"])
        counts.update(skips.counts())
        skips.report(exclude=(TRUNCATED_AWAY,))  # one warning; cut answers have their own
        if not is_text:
            cut = {"train": (train, located["train"]), "validation": (val, located["val"])}
            check_cut_answers(
                cut, len(usable), len(self.val_set), counts, self.max_length, self.rows_read,
                self.where(),
            )  # fmt: skip
        check_not_empty(len(usable), len(self.val_set), counts, self.where())
        self.train_lengths = usable["length"]
        self.train_set = usable.select_columns(["input_ids", "labels"])
        if not is_text:
            del counts["dropped_tail_tokens"]
        self.stats |= {
            "fingerprint_train": train_key,
            "fingerprint_val": val_key,
            "tokenized_from_cache": train_hit and val_hit,
            "examples_read": self.rows_read + sum(skipped.values()),
            "train_examples": len(self.train_set),
            "val_examples": len(self.val_set),
            "train_tokens": sum(self.train_lengths),
            "train_supervised_tokens": sum(usable["n_labels"]),
            **dict(sorted(counts.items())),
        }
        log.info("Data: %s", self.stats)

    # -- loaders ---------------------------------------------------------------------------------

    accumulate = 1  # micro-batches per optimizer step (train.py: trainer.accumulate_grad_batches)

    def train_dataloader(self) -> StepLoader | StreamSteps:
        """One optimizer step per item: a batch of `batch_size`, or with `accumulate` > 1 the
        list of the step's micro-batches, length-grouped and split over devices by `StepSampler`."""
        collate = lm_collator(self.tokenizer)
        if self.packing:  # a row holds at least the longest example (a text chunk: block_size)
            collate = packed_collator(self.tokenizer, max(self.max_length, self.block_size))
        if self.streaming:
            stream = split_stream(self.train_set.shuffle(seed=self.seed), self.trainer)
            return StreamSteps(stream, self.batch_size, self.accumulate, collate, self.num_workers)
        share = device_share(self.trainer)  # the trainer is None outside a fit
        sampler = StepSampler(
            self.train_lengths, self.batch_size, self.accumulate, self.seed, **share,
            max_tokens=None if self.packing else self.micro_batch_tokens,
        )  # fmt: skip
        return StepLoader(self.train_set, sampler, collate, self.num_workers)

    def val_dataloader(self) -> DataLoader:  # padded batches, with `packing` too
        collate, workers = lm_collator(self.tokenizer), self.num_workers
        return eval_loader(self.val_set, self.eval_batch_size, collate, workers, self.trainer)
