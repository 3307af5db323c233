"""Tokenized splits: a `datasets.map` cached by data fingerprint + tokenizer + options, the usable
rows kept with their skips counted, and the checks on what truncation cut away.

The cache lives under the datasets cache (`lorafit_tokenized/KEY.arrow`), so running the same data
again reads the tokenized arrow file instead of tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from lorafit.data.encoding import FEATURES
from lorafit.data.formats import DataError
from lorafit.data.reader import Locator, SkipLog, name_rows

log = logging.getLogger(__name__)

# A column added to the rows read: each row's 1-based number in its source split (file order), so
# messages can name rows after the train/validation split has shuffled them.
ROW = "_lorafit_row"
TRUNCATED_AWAY = "no_labels_after_truncation"  # the skip reason of a row whose answer was cut off


def numbered(rows):
    """The rows with a `ROW` column (a stream, or rows that have one, are returned as they are)."""
    if not isinstance(rows, datasets.Dataset) or ROW in rows.column_names:
        return rows
    key = hashlib.sha256(f"{rows._fingerprint} {ROW}".encode()).hexdigest()[:16]
    return rows.add_column(ROW, np.arange(1, len(rows) + 1), new_fingerprint=key)


def log_padding(tokenizer) -> None:
    """Log the pad token batches are padded with, and whether it is the end-of-sequence token."""
    if tokenizer.pad_token_id is None:
        log.info(
            "Data: the tokenizer has no pad token; batches are padded with eos %r (id %s), "
            "masked by attention_mask and -100 labels, so end tokens inside examples are still "
            "trained.",
            tokenizer.eos_token,
            tokenizer.eos_token_id,
        )
        return
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        how = (
            "the same as eos: padding is excluded by attention_mask and -100 labels, so end "
            "tokens inside examples are still trained"
        )
    else:
        how = f"not eos ({tokenizer.eos_token!r}, id {tokenizer.eos_token_id})"
    log.info("Data: pad token %r (id %s), %s.", tokenizer.pad_token, tokenizer.pad_token_id, how)


def cached_map(
    rows: datasets.Dataset,
    fn: Callable,
    batched: bool,
    remove: list[str],
    options: list[Any],
    cache_dir: str | None,
    num_proc: int | None,
    split: str,
) -> tuple[datasets.Dataset, str, bool]:
    """`rows.map(fn)` into the `FEATURES` columns, cached under a key of the rows' fingerprint and
    `options` (everything else that changes the output: tokenizer, lengths, masking, ...).

    Returns:
        (tokenized rows, cache key, whether they were read from the cache).
    """
    text = json.dumps([rows._fingerprint, options], sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "lorafit_tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    hit = any(folder.glob(f"{key}*.arrow"))
    t0 = time.perf_counter()
    out = rows.map(
        fn,
        batched=batched,
        remove_columns=remove,
        features=FEATURES,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        num_proc=num_proc,
        desc=f"Tokenizing {split}",
    )
    log.info(
        "Data %s: %d rows %s in %.2f s (key %s, %s)",
        split,
        len(out),
        "read from the tokenization cache" if hit else "tokenized",
        time.perf_counter() - t0,
        key,
        folder,
    )
    return out, key, hit


def keep_usable(tok, counts: Counter, skips: SkipLog, locator: Locator):
    """Count skips (in `skips`, named by their `row` numbers), notes, truncations and dropped
    tail tokens; return the usable rows."""
    skipped = tok["skip"]
    counts.update(n for n, s in zip(tok["note"], skipped, strict=True) if n and not s)
    counts["truncated"] += sum(tok["truncated"])
    counts["dropped_tail_tokens"] += sum(tok["dropped"])
    by_reason: dict[str, list[int]] = {}
    for i, s in enumerate(skipped):
        if s and s != "tail":
            by_reason.setdefault(s, []).append(i)
    for reason, idx in by_reason.items():
        numbers = tok.select(idx)["row"]
        if all(numbers):
            skips.add(reason, numbers, locator)
        else:  # rows without numbers (a stream's)
            skips.add(reason, n=len(idx))
    keep = [i for i, s in enumerate(skipped) if not s]
    return tok.select(keep) if len(keep) < len(tok) else tok


def check_not_empty(n_train: int, n_val: int, counts: Counter, where: str) -> None:
    """Raises DataError when no training or no validation example is left after reading and
    filtering; names the data, the skip counts and, for missing fields, data.format."""
    empty = [s for s, n in (("training", n_train), ("validation", n_val)) if n == 0]
    if not empty:
        return
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped_") and v}
    missing = [k for k in skipped if k.startswith(("skipped_missing_", "skipped_non_string_"))]
    raise DataError(
        f"{where}: no {' and no '.join(empty)} example is left after reading and filtering the "
        f"data (rows skipped: {skipped or 'none'}). "
        + (
            f"Rows lack the fields that data.format needs ({', '.join(missing)}): check "
            "data.format / data.columns against the file's fields."
            if missing
            else "Give more data, or change data.val_fraction / data.val_examples so that both "
            "splits keep rows."
        )
    )


def check_cut_answers(
    splits: dict[str, tuple[Any, Locator]],
    n_train: int,
    n_val: int,
    counts: Counter,
    max_length: int,
    rows_read: int,
    where: str,
) -> None:
    """Warn once about rows skipped because `max_length` cut away their whole answer, naming
    them by file and line; when that leaves a split empty, raise an error naming data.max_length.

    Args:
        splits: split -> (tokenized rows, with `row` numbers, and the `Locator` of their
            source split).
        n_train, n_val: usable examples left in each split.
        counts: the skip counts so far (others are named in the error).
        max_length: `data.max_length`; `rows_read` the rows read in all; `where` names the data.

    Raises:
        DataError: a split has no example left and rows were cut away: names data.max_length,
            the number of rows cut away, their prompts' shortest and longest token counts and
            the max_length that keeps them.
    """
    located, prompts, whole = [], [], []
    for tok, locator in splits.values():
        idx = [i for i, s in enumerate(tok["skip"]) if s == TRUNCATED_AWAY]
        if not idx:
            continue
        cut = tok.select(idx)
        prompts += cut["prompt_length"]
        whole += cut["full_length"]
        located += [locator.locate(n) for n in cut["row"]]
    if not prompts:
        return
    listed = name_rows(located)
    lo, hi, n = min(prompts), max(prompts), len(prompts)
    lengths = f"{lo} to {hi}" if lo < hi else f"all {hi}"
    keep = (
        f"data.max_length={hi + 1} keeps at least their first answer token, {max(whole)} "
        "keeps them whole"
    )
    empty = [s for s, size in (("training", n_train), ("validation", n_val)) if size == 0]
    if empty:
        others = {
            k: v
            for k, v in counts.items()
            if k.startswith("skipped_") and k != f"skipped_{TRUNCATED_AWAY}" and v
        }
        raise DataError(
            f"data.max_length={max_length} leaves no {' and no '.join(empty)} example: "
            f"it cut away the whole answer of {n} of {rows_read} rows of {where} "
            f"({listed}), whose prompts are {lengths} tokens long (the chat template's "
            f"system message included); set data.max_length to at least {hi + 1} "
            f"({max(whole)} keeps every one whole)"
            + (f". Other rows skipped: {others}." if others else ".")
        )
    log.warning(
        "data.max_length=%d cut away the whole answer of %d rows of %s (%s), which are skipped "
        "(skipped_%s); their prompts are %s tokens long: %s.",
        max_length,
        n,
        where,
        listed,
        TRUNCATED_AWAY,
        lengths,
        keep,
    )
