"""Read data sets through `datasets.load_dataset` and turn their rows into message lists or text.

One key, `data.path`, names a local file, folder or glob, or a hub id; the format of the rows is
`data.format`, one small converter each (`messages`, `sharegpt`, `alpaca`, `prompt_completion`,
`text`, `columns`), or `auto`, which picks one from the column names and says which.
A converter returns a list of `{"role", "content"}` messages (or a string for `text`) and raises
`Skip(reason)` for a row that cannot train; the reasons are counted into the run's data stats.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import yaml

from lorafit.models import package_file

log = logging.getLogger(__name__)

Message = dict[str, str]
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "columns")
COLUMN_KEYS = ("messages", "text", "system", "prompt", "input", "response")

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
# ShareGPT speaker names (`from`) -> OpenAI roles; as LLaMA-Factory and axolotl map them.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad data input; the message names the file (and line) or config key to fix."""


class Skip(Exception):  # noqa: N818 (a signal, not an error)
    """A row that cannot become a training example; `args[0]` is the reason counted in stats."""


# -------------------------------------------------------------------------------------------------
# Loading


def load_splits(
    path: str,
    data_files: Any = None,
    revision: str | None = None,
    name: str | None = None,
    streaming: bool = False,
    key: str = "data.path",
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load every split of a local file, folder, glob or hub id with `datasets.load_dataset`.

    A file or glob picks the builder from its suffix (`.jsonl` -> json, `.tsv` -> csv with tab
    separator, `.txt` -> text, ...); a folder written by `save_to_disk` is read with
    `load_from_disk`; any other folder, a builder name (`json` with `data_files`) or a hub id goes
    to `load_dataset` as it is, which infers the rest.

    Raises:
        DataError: nothing matches `path`, or `datasets` cannot read it (names `key`, the config
            key that gave the path, the path and why).
    """
    local = Path(path).expanduser()
    kwargs: dict[str, Any] = {"revision": revision, "streaming": streaming}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
        saved = datasets.load_from_disk(str(local))  # a folder written by `save_to_disk`
        return {"train": saved} if isinstance(saved, datasets.Dataset) else saved
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
    else:
        args = (str(local) if local.is_dir() else path, name)
    try:
        splits = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types; all mean "cannot read this input"
        if args[0] == "json" and (where := first_bad_json_line(kwargs["data_files"])):
            raise DataError(
                f"{key}='{path}': {where}. Each line of a .jsonl file must be one JSON object."
            ) from None
        raise DataError(
            f"{key}='{path}' could not be read by datasets.load_dataset: "
            f"{type(e).__name__}: {e}. Check that the file is well formed (one JSON object per "
            "line for .jsonl, a header row for .csv) or that the hub id (and revision) exist."
        ) from None
    if isinstance(splits, datasets.Dataset | datasets.IterableDataset):
        splits = {"train": splits}
    return splits


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
            with p.open(encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        if n == 1:  # maybe one (pretty-printed) JSON document, not JSON Lines
                            return None
                        return f"{p} line {n}: not valid JSON ({e.msg}, column {e.colno})"
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


# -------------------------------------------------------------------------------------------------
# Field access and detection


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def get_field(row: Any, path: str) -> Any:
    """Read a nested field, `get_field(row, "instances[0].output")`; None if a step is missing."""
    for key, index in _PATH_PART.findall(path):
        if key:
            row = row.get(key) if isinstance(row, Mapping) else None  # `map` passes LazyRow
        else:
            i = int(index)
            row = row[i] if isinstance(row, list | tuple) and i < len(row) else None
        if row is None:
            return None
    return row


def detect_format(columns: list[str], first_row: dict[str, Any]) -> str:
    """Pick a format from the column names (and, for `conversations`, the first turn's keys).

    Raises:
        DataError: no known column set; names the columns and the `data.columns` fix.
    """
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = first_row.get("conversations") or [{}]
        return "sharegpt" if isinstance(turns[0], dict) and "from" in turns[0] else "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(
        f"data.format=auto cannot tell the format from the columns {sorted(cols)}. Set "
        f"data.format to one of {list(FORMATS)}, or map your fields, e.g. "
        "data.format=columns 'data.columns={prompt: question, response: answer}' "
        "(nested paths work, quoted for Hydra: \"data.columns={prompt: 'instances[0].input', "
        "response: 'instances[0].output'}\")."
    )


# -------------------------------------------------------------------------------------------------
# Converters: row -> list of messages (chat formats) or str (text)


def _text(value: Any, what: str) -> str:
    """A message content as a string; OpenAI content parts `[{"type": "text", ...}]` joined."""
    if isinstance(value, list):
        value = "".join(p.get("text") or "" for p in value if isinstance(p, dict))
    if value is None:
        raise Skip(f"missing_{what}")
    return str(value)


def _checked(msgs: list[Message]) -> list[Message]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise Skip("no_assistant_turn")
    return msgs


def from_messages(turns: Any) -> list[Message]:
    """OpenAI-style `[{"role": "system"|"user"|"assistant", "content": ...}, ...]`."""
    if not isinstance(turns, list) or not turns:
        raise Skip("missing_messages")
    msgs = []
    for t in turns:
        role = (t or {}).get("role")
        if role not in ROLES:
            raise Skip(f"unknown_role_{role}")
        msgs.append({"role": role, "content": _text(t.get("content"), "content")})
    return _checked(msgs)


def from_sharegpt(turns: Any) -> list[Message]:
    """ShareGPT `[{"from": "human"|"gpt"|"system", "value": ...}, ...]`."""
    if not isinstance(turns, list) or not turns:
        raise Skip("missing_conversations")
    msgs = []
    for t in turns:
        role = SHAREGPT_ROLES.get(str((t or {}).get("from")).lower())
        if role is None:
            raise Skip(f"unknown_role_{(t or {}).get('from')}")
        msgs.append({"role": role, "content": _text(t.get("value"), "value")})
    return _checked(msgs)


def from_pair(
    prompt: Any, response: Any, system: Any = None, extra_input: Any = None
) -> list[Message]:
    """One user turn (prompt, then `input` after a blank line, as Alpaca does) and one answer."""
    user = _text(prompt, "prompt")
    if extra_input not in (None, ""):
        user = f"{user}\n\n{extra_input}"
    msgs = [{"role": "system", "content": str(system)}] if system not in (None, "") else []
    return msgs + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(response, "response")},
    ]


def make_converter(fmt: str, columns: dict[str, str] | None = None) -> Callable[[dict], Any]:
    """The row converter for one format.

    Args:
        fmt: one of `FORMATS` (not `auto`; detect first).
        columns: for `columns`, internal field -> (nested) path in the row: either `messages`
            (a list of role/content turns), `text`, or `prompt` + `response` with optional
            `system` and `input`.

    Raises:
        DataError: unknown format, or a `columns` mapping with unknown or missing keys.
    """
    if fmt == "messages":
        return lambda r: from_messages(r.get("messages", r.get("conversations")))
    if fmt == "sharegpt":
        return lambda r: from_sharegpt(r.get("conversations"))
    if fmt == "alpaca":
        return lambda r: from_pair(r.get("instruction"), r.get("output"), None, r.get("input"))
    if fmt == "prompt_completion":
        return _prompt_completion
    if fmt == "text":
        return lambda r: _text(r.get("text"), "text")
    if fmt != "columns":
        raise DataError(f"data.format='{fmt}' is unknown; use auto or one of {list(FORMATS)}.")
    cols = dict(columns or {})
    bad = sorted(set(cols) - set(COLUMN_KEYS))
    usable = "messages" in cols or "text" in cols or {"prompt", "response"} <= cols.keys()
    if bad or not usable:
        raise DataError(
            f"data.columns={cols} must map 'messages', or 'text', or 'prompt' and 'response' "
            f"(optional 'system', 'input') to fields of your rows; unknown keys: {bad}."
        )
    if "messages" in cols:
        return lambda r: from_messages(get_field(r, cols["messages"]))
    if "text" in cols:
        return lambda r: _text(get_field(r, cols["text"]), "text")
    return lambda r: from_pair(
        *(get_field(r, cols[k]) if k in cols else None for k in ("prompt", "response")),
        *(get_field(r, cols[k]) if k in cols else None for k in ("system", "input")),
    )


def _prompt_completion(row: dict) -> list[Message]:
    """TRL's `prompt`/`completion`: two strings, or two message lists (conversational form)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return from_messages(prompt + completion)
    return from_pair(prompt, completion)
