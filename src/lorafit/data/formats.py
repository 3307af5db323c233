"""Row formats: turn a data set's rows into message lists or text.

The row format is `data.format`, one small converter each (`messages`, `sharegpt`, `alpaca`,
`prompt_completion`, `text`, `columns`), or `auto`, which picks one from the column names and says
which. A converter returns a list of `{"role", "content"}` messages (or a string for `text`) and
raises `Skip(reason)` for a row that cannot train; the reasons are counted into the run's data
stats.
Reading files and built-in corpora is `lorafit.data.sources`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, str]
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "columns")
COLUMN_KEYS = ("messages", "text", "system", "prompt", "input", "response")

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


class RowError(DataError):
    """A row that stops the run: `args` are (its 1-based row number in its split, the problem);
    the data module names the file and line (`lorafit.data.reader.Locator`)."""

    def __str__(self) -> str:
        return f"row {self.args[0]}: {self.args[1]}"


class Skip(Exception):  # noqa: N818 (a signal, not an error)
    """A row that cannot become a training example; `args[0]` is the reason counted in stats,
    naming the field where there is one (`missing_output`, `non_string_content`)."""


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


def detect_format(columns: list[str], first_row: dict[str, Any], where: str = "") -> str:
    """Pick a format from the column names (and, for `conversations`, the first turn's keys).

    Raises:
        DataError: no known column set; names the data (`where`), the columns and the
            `data.columns` fix.
    """
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        turns = first_row.get("conversations") or [{}]
        first = turns[0] if isinstance(turns, list) else None
        return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(
        (f"{where}: " if where else "")
        + f"data.format=auto cannot tell the format from the columns {sorted(cols)}. Set "
        f"data.format to one of {list(FORMATS)}, or map your fields, e.g. "
        "data.format=columns 'data.columns={prompt: question, response: answer}' "
        "(nested paths work, quoted for Hydra: \"data.columns={prompt: 'instances[0].input', "
        "response: 'instances[0].output'}\")."
    )


# -------------------------------------------------------------------------------------------------
# Converters: row -> list of messages (chat formats) or str (text)


def _text(value: Any, what: str) -> str:
    """A field's text: a string as it is, OpenAI content parts `[{"type": "text", ...}]` joined.

    Raises:
        Skip: `missing_<what>` for a null or absent field, `non_string_<what>` for any other
            value (a JSON number has lost its written form: `1.50` reads as 1.5; an object or a
            boolean is no text).
    """
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        value = "".join(str(p.get("text") or "") for p in value)
    if value is None:
        raise Skip(f"missing_{what}")
    if not isinstance(value, str):
        raise Skip(f"non_string_{what}")
    return value


def _document(value: Any, what: str) -> str:
    """A `text` row's document; an empty or blank one is skipped (`empty_<what>`)."""
    text = _text(value, what)
    if not text.strip():
        raise Skip(f"empty_{what}")
    return text


def _turns(turns: Any, what: str) -> list[dict]:
    """A conversation's turns: a non-empty list of objects (else `missing_`/`non_list_`...)."""
    if turns is None or turns == []:
        raise Skip(f"missing_{what}")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise Skip(f"malformed_{what}")
    return turns


def first_user_turn(msgs: list[Message]) -> int:
    """Index of the first user turn (`len(msgs)` when there is none)."""
    return next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))


def drop_opening_turns(msgs: list[Message]) -> tuple[list[Message], int]:
    """(the conversation without the assistant turns before its first user turn, how many went).

    Such a turn (a bot's greeting, as ShareGPT exports often begin) answers nothing, so it is not
    trained on; it is dropped rather than kept as context because chat templates cannot render
    the empty prompt it would follow (transformers: "empty conversation") and many refuse a
    conversation that does not open with a user turn. System messages stay.
    """
    first = first_user_turn(msgs)
    kept = [m for m in msgs[:first] if m["role"] != "assistant"] + msgs[first:]
    return kept, len(msgs) - len(kept)


def _checked(msgs: list[Message]) -> list[Message]:
    """The conversation, if it can train: it needs an assistant turn after a user turn (else
    `no_assistant_turn`; one before the first user turn is dropped by `drop_opening_turns`), and
    no answer may be empty or blank (`empty_answer`: it would train the end-of-turn token alone)."""
    answers = [m for m in msgs[first_user_turn(msgs) :] if m["role"] == "assistant"]
    if not answers:
        raise Skip("no_assistant_turn")
    if any(not m["content"].strip() for m in answers):
        raise Skip("empty_answer")
    return msgs


def from_messages(turns: Any) -> list[Message]:
    """OpenAI-style `[{"role": "system"|"user"|"assistant", "content": ...}, ...]`."""
    msgs = []
    for t in _turns(turns, "messages"):
        role = t.get("role")
        if role not in ROLES:
            raise Skip(f"unknown_role_{role}")
        msgs.append({"role": role, "content": _text(t.get("content"), "content")})
    return _checked(msgs)


def from_sharegpt(turns: Any) -> list[Message]:
    """ShareGPT `[{"from": "human"|"gpt"|"system", "value": ...}, ...]`."""
    msgs = []
    for t in _turns(turns, "conversations"):
        role = SHAREGPT_ROLES.get(str(t.get("from")).lower())
        if role is None:
            raise Skip(f"unknown_role_{t.get('from')}")
        msgs.append({"role": role, "content": _text(t.get("value"), "value")})
    return _checked(msgs)


PAIR_FIELDS = ("prompt", "response", "system", "input")


def from_pair(
    prompt: Any,
    response: Any,
    system: Any = None,
    extra_input: Any = None,
    fields: tuple[str, ...] = PAIR_FIELDS,
) -> list[Message]:
    """One user turn (prompt, then `input` after a blank line, as Alpaca does) and one answer.

    `fields` are the row's names for the four values; skip reasons name them (`missing_output`).
    """
    user = _text(prompt, fields[0])
    if extra_input not in (None, ""):
        user = f"{user}\n\n{_text(extra_input, fields[3])}"
    msgs = []
    if system not in (None, ""):
        msgs.append({"role": "system", "content": _text(system, fields[2])})
    msgs += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(response, fields[1])},
    ]
    return _checked(msgs)


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
        names = ("instruction", "output", "system", "input")
        return lambda r: from_pair(
            r.get("instruction"), r.get("output"), None, r.get("input"), names
        )
    if fmt == "prompt_completion":
        return _prompt_completion
    if fmt == "text":
        return lambda r: _document(r.get("text"), "text")
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
        return lambda r: _document(get_field(r, cols["text"]), cols["text"])
    names = tuple(cols.get(k, k) for k in PAIR_FIELDS)
    return lambda r: from_pair(
        *(get_field(r, cols[k]) if k in cols else None for k in PAIR_FIELDS), fields=names
    )


def _prompt_completion(row: dict) -> list[Message]:
    """TRL's `prompt`/`completion`: two strings, or two message lists (conversational form)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return from_messages(prompt + completion)
    return from_pair(prompt, completion, fields=("prompt", "completion", "system", "input"))


def held_out_prompts(rows, convert, k: int) -> list[tuple[list[Message], str]]:
    """Up to k held-out prompts for samples.jsonl: a conversation up to its last assistant turn,
    with that turn as the reference answer (rows that cannot train are passed over)."""
    out = []
    for row in rows:
        if len(out) >= k:
            break
        try:
            msgs, _ = drop_opening_turns(convert(row))
        except Skip:
            continue
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append((msgs[:last], msgs[last]["content"]))
    return out
