"""The reader layer: every local data file is decoded and located here before `datasets` reads it,
so that any later message can name a row by file and line (or row), and every skip is counted and
logged once in the same words.

`scan_files` checks a split's files: bytes that are not valid in `data.encoding` (UTF-8 by
default) are an error naming the file, line and byte offset, unless `data.encoding_errors` (a
Python codec error handler: `replace`, `ignore`, ...) says how to decode them, when the lines
holding them are counted. A UTF-8 byte order mark is read transparently. A file that needs either
is decoded once into a UTF-8 copy (cached by content), which `datasets` reads instead.

`Locator` maps a split's row numbers (1-based, in file order: the `ROW` column) back to
`file line N` (JSON Lines, CSV/TSV records, text lines) or `file row N` (any other file), and
`SkipLog` turns the skipped rows of every reason into one count each and one log line.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import hashlib
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.formats import DataError
from lorafit.runinfo import atomic_write

log = logging.getLogger(__name__)

BOM = codecs.BOM_UTF8
LINE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".md"}  # text files


@dataclass
class FileRows:
    """One file's records: `lines[i]` is the 1-based line where record i + 1 starts (None when
    records have no line of their own: parquet, arrow, a pretty-printed JSON document)."""

    path: Path
    lines: list[int] | None = None


@dataclass
class Scan:
    """What reading a split's files found: the files `datasets` should read (UTF-8 copies where
    needed), each original file's record lines, and counts (`decoded_replaced_lines`, ...)."""

    read: list[str] = field(default_factory=list)
    files: list[FileRows] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def decode(raw: bytes, path: Path, encoding: str, errors: str | None, key: str) -> tuple[str, int]:
    """Decode one file's bytes; a leading UTF-8 byte order mark is dropped.

    Returns:
        (text, number of lines holding bytes that `errors` had to handle).

    Raises:
        DataError: a byte sequence not valid in `encoding` and no `errors` handler: names the
            file, the line, the byte offset (from the start of the file, 0-based) and the bytes.
    """
    skipped = 0  # bytes of a byte order mark dropped before decoding
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8") and raw.startswith(BOM):
        raw, skipped = raw[len(BOM) :], len(BOM)
    try:
        return raw.decode(encoding), 0
    except UnicodeDecodeError as e:
        if errors in (None, "strict"):
            line = raw.count(b"\n", 0, e.start) + 1
            offset = e.start + skipped
            raise DataError(
                f"{path} line {line}, byte offset {offset}: {raw[e.start : e.end]!r} is not valid "
                f"{encoding} ({key}). Re-save the file as UTF-8, set data.encoding to the file's "
                "encoding (for example data.encoding=latin-1), or set "
                "data.encoding_errors=replace to decode bad bytes as U+FFFD (those lines are "
                "counted)."
            ) from None
    except LookupError:
        raise DataError(f"data.encoding='{encoding}' is not a known text encoding.") from None
    try:
        _COUNTING["handler"] = codecs.lookup_error(errors)
    except LookupError:
        raise DataError(
            f"data.encoding_errors='{errors}' is not a codec error handler; use strict, replace, "
            "ignore or backslashreplace."
        ) from None
    _COUNTING["at"] = []
    text = raw.decode(encoding, errors="lorafit-count")
    lines = {raw.count(b"\n", 0, at) + 1 for at in _COUNTING.pop("at")}
    return text, len(lines)


# The codec error handler `decode` uses: the chosen handler's output, each error's offset noted.
_COUNTING: dict = {}


def _count(err: UnicodeDecodeError):
    _COUNTING["at"].append(err.start)
    return _COUNTING["handler"](err)


codecs.register_error("lorafit-count", _count)


def record_lines(text: str, suffix: str, path: Path | None = None) -> list[int] | None:
    """The 1-based line where each record of a decoded file starts, as `datasets` reads them:
    non-blank lines of JSON Lines, records after the header of CSV / TSV (a quoted cell may span
    lines; blank lines are no record), every line of a text file. None for a JSON document.

    Raises:
        DataError: a CSV / TSV record with more cells than the header (pandas refuses it).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if suffix in (".txt", ".md"):
        return list(range(1, len(lines) + 1))
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
        starts, last, width = [], 0, 0
        try:
            for record in reader:
                if record and width and len(record) > width:
                    raise DataError(
                        f"{path} line {last + 1}: {len(record)} cells, but the header has "
                        f"{width}; quote a cell that holds the separator {sep!r} "
                        '(`"a, b"`), or remove the extra cells.'
                    )
                if record and width:
                    starts.append(last + 1)
                width = width or len(record)
                last = reader.line_num
        except csv.Error:
            return None
        return starts
    if text.lstrip()[:1] == "[":
        return None
    return [n for n, line in enumerate(lines, 1) if line.strip()]


def scan_files(
    files: Iterable[str], encoding: str, errors: str | None, cache: Path, key: str
) -> Scan:
    """Decode and locate a split's local files (see the module docstring).

    Args:
        files: the paths `datasets` would read (local files; anything else is passed through).
        encoding, errors: `data.encoding` and `data.encoding_errors`.
        cache: folder for UTF-8 copies of files that needed decoding.
        key: the config key that named the files, for messages.

    Raises:
        DataError: bytes not valid in `encoding` (see `decode`).
    """
    scan = Scan()
    for name in files:
        path = Path(name)
        if not path.is_file() or path.suffix.lower() not in LINE_SUFFIXES:
            scan.read.append(str(name))
            scan.files.append(FileRows(path))
            continue
        raw = path.read_bytes()
        text, replaced = decode(raw, path, encoding, errors, key)
        lines = record_lines(text, path.suffix.lower(), path)
        scan.files.append(FileRows(path, lines))
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json") and lines is not None:
            # JSON Lines without blank lines: pandas, datasets' fallback when the columns'
            # types differ between rows, cannot read blank lines.
            text = "".join(line + "\n" for line in text.split("\n") if line.strip())
        if replaced:
            scan.counts["decoded_replaced_lines"] += replaced
        if raw.startswith(BOM):
            scan.counts["files_with_bom"] += 1
        if text.encode("utf-8") == raw:
            scan.read.append(str(name))
            continue
        digest = hashlib.sha256(raw + f"{encoding} {errors}".encode()).hexdigest()[:16]
        copy = cache / f"{digest}{path.suffix}"
        if not copy.is_file():  # written once: the same bytes keep the same datasets fingerprint
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(copy, text.encode("utf-8"))
        scan.read.append(str(copy))
        log.info("%s: read %s as UTF-8 from %s (%s)", key, path, copy, encoding)
    if scan.counts["decoded_replaced_lines"]:
        log.warning(
            "%s: %d lines held bytes that are not valid %s; decoded with "
            "data.encoding_errors=%s (counted as decoded_replaced_lines).",
            key,
            scan.counts["decoded_replaced_lines"],
            encoding,
            errors,
        )
    return scan


class Locator:
    """Names a split's rows (1-based numbers in file order) as `file line N` or `file row N`.

    When a file's record count does not match what `datasets` read (a JSON document with a
    nested field, say), rows are named by their number in the split instead.
    """

    def __init__(self, files: list[FileRows], n_rows: int | None, where: str):
        self.where, self.files = where, files
        counts = [len(f.lines) if f.lines is not None else None for f in files]
        self.exact = bool(files) and None not in counts and sum(counts) == n_rows
        self.starts = []  # first split row number of each file
        total = 1
        for c in counts if self.exact else []:
            self.starts.append(total)
            total += c

    def locate(self, row: int) -> tuple[str, str, int]:
        """(file or data name, `line` or `row`, number) of split row `row`."""
        if not self.exact:
            only = len(self.files) == 1
            return (str(self.files[0].path) if only else self.where), "row", row
        i = bisect.bisect_right(self.starts, row) - 1
        return str(self.files[i].path), "line", self.files[i].lines[row - self.starts[i]]

    def name(self, row: int) -> str:
        where, unit, n = self.locate(row)
        return f"{where} {unit} {n}"

    def names(self, rows: Iterable[int], k: int = 5) -> str:
        """`"a.jsonl lines 2, 5, 9"`: the first k rows, then how many in all."""
        return name_rows([self.locate(r) for r in rows], k)


def name_rows(located: list[tuple[str, str, int]], k: int = 5) -> str:
    """`"a.jsonl lines 2, 5, 9, 11, 12, ... (40 in all)"` from `Locator.locate` results."""
    first = sorted(located)[:k]
    by_file: dict[tuple[str, str], list[str]] = defaultdict(list)
    for where, unit, n in first:
        by_file[where, unit].append(str(n))
    more = f", ... ({len(located)} in all)" if len(located) > k else ""
    return "; ".join(f"{w} {u}s {', '.join(ns)}" for (w, u), ns in by_file.items()) + more


class SkipLog:
    """Skipped rows by reason: each reason is counted (`skipped_<reason>` in the data stats, hence
    in metrics.json's `data`) and all reasons are logged once, with the first rows of each."""

    def __init__(self):
        self.found: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        self.unnamed: Counter = Counter()

    def add(self, reason: str, rows: Iterable[int] = (), locator: Locator | None = None, n=0):
        """Record skipped rows of one reason: split row numbers named by `locator`, or a count
        `n` of rows that have no number (text chunks, rows dropped while reading)."""
        if locator is None:
            self.unnamed[reason] += n
        else:
            self.found[reason].extend(locator.locate(r) for r in rows)

    def counts(self) -> Counter:
        out = Counter({f"skipped_{r}": len(v) for r, v in self.found.items() if v})
        out.update({f"skipped_{r}": n for r, n in self.unnamed.items() if n})
        return out

    def report(self, exclude: Iterable[str] = ()) -> str:
        """Log every reason once with its count and first rows (but those in `exclude`, which
        have a warning of their own); returns the text logged."""
        found = {r: v for r, v in self.found.items() if v and r not in exclude}
        parts = [f"{r} {len(v)} ({name_rows(v)})" for r, v in sorted(found.items())]
        parts += [f"{r} {n}" for r, n in sorted(self.unnamed.items()) if n and r not in exclude]
        if not parts:
            return ""
        text = "Data: rows skipped (metrics.json data.skipped_<reason>): " + "; ".join(parts)
        log.warning(text)
        return text
