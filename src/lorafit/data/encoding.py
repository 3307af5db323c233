"""Rows as messages or text -> rendered, tokenized, label-masked examples; padding into batches.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages and
becomes one example: the whole conversation rendered by the chat template, with labels on the
assistant turns only (prompt tokens get -100, the ignore index of `F.cross_entropy`). A template
that marks assistant text with `{% generation %}` ... `{% endgeneration %}` gets its mask from
transformers (`apply_chat_template(return_assistant_tokens_mask=True)`); any other template gets
it from character offsets of the rendered text (not by searching for marker token ids), so any
template that renders prefixes consistently works. Plain text is tokenized, joined with
end-of-sequence tokens and cut into `block_size` chunks, every token a label. Batches are padded
by transformers' collators.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from typing import Any

import datasets
from transformers import DataCollatorForSeq2Seq

from lorafit.data.formats import DataError, Message, RowError, Skip, drop_opening_turns

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ENCODING_VERSION = 4  # bump when the encoding below changes, so old caches are not reused

# ChatML (`data.template=chatml`), for a tokenizer that ships no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); a system
# message replaces the preamble; the answer ends with the tokenizer's eos token.
ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a "
    "task. Write a response that appropriately completes the request.\n\n' }}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
# `{% generation %}` (any whitespace control): the template marks the assistant's own text.
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Columns of a tokenized split. `skip` is empty for a usable example, else the reason it is not;
# `dropped` carries tail tokens that chunking left out (on a bookkeeping row with skip "tail");
# `prompt_length` (tokens before the first label) and `full_length` are counted before truncation;
# `note` names a change to a usable example that the stats count (opening assistant turn dropped);
# `row` is the 1-based number of the row it came from (0: a text chunk, or rows without numbers),
# which `lorafit.data.reader.Locator` turns into a file and line.
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_labels": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "skip": datasets.Value("string"),
        "dropped": datasets.Value("int32"),
        "prompt_length": datasets.Value("int32"),
        "full_length": datasets.Value("int32"),
        "note": datasets.Value("string"),
        "row": datasets.Value("int64"),
    }
)


# -------------------------------------------------------------------------------------------------
# Templates, rendering and masking


def resolve_template(tokenizer, template: str | None) -> tuple[str, str]:
    """The chat template to use, as (name, Jinja source).

    Args:
        template: None (the tokenizer's own), `chatml`, `alpaca`, or a Jinja template string
            (anything containing `{{` or `{%`).

    Raises:
        DataError: a name that is neither a known template nor Jinja, or None with a tokenizer
            that has no chat template (names the model and data.template: guessing one would
            train the model on a format it was never given).
    """
    if template is None:
        if isinstance(tokenizer.chat_template, str):
            return "tokenizer", tokenizer.chat_template
        raise DataError(
            f"The tokenizer of '{tokenizer.name_or_path}' has no chat template, and this data is "
            "chat data; set data.template=chatml (or alpaca, or a Jinja template) to choose the "
            "format the model learns, or use a model whose tokenizer has one."
        )
    if template in TEMPLATES:
        return template, TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return "custom", template
    raise DataError(
        f"data.template='{template}' is neither a named template {sorted(TEMPLATES)} nor a Jinja "
        "template (a string with {{ ... }} or {% ... %}); leave it null to use the tokenizer's."
    )


def render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template; ChatML when it has none (only
    `lorafit generate` meets one: training data sets the template with `resolve_template`)."""
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=None if tokenizer.chat_template else CHATML_TEMPLATE,
    )


def assistant_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return it with the character spans of every assistant turn.

    A span starts after the generation prompt (`<|im_start|>assistant\\n` in ChatML) and ends after
    the turn's end-of-turn marker, trailing whitespace excluded, so the model learns to stop.

    Raises:
        DataError: the template does not render prefixes consistently (cannot locate turns).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(upto):
            raise DataError(
                "The chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located; set a template that does "
                "(for example data.template=chatml)."
            )
        spans.append((start, len(upto.rstrip())))
    return text, spans


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with `{% generation %}`."""
    template = tokenizer.chat_template
    return isinstance(template, str) and GENERATION_TAG.search(template) is not None


def generation_mask(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(token ids, mask) from transformers: 1 on every token overlapping a `{% generation %}`
    block of the tokenizer's template (which must have one), 0 elsewhere."""
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def offset_mask(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(token ids, mask) from character offsets: 1 on every token overlapping an assistant span
    of `assistant_spans`, 0 elsewhere.

    A token that straddles a span's start (" A" after "assistant:") carries the answer's first
    characters, so it is in the mask.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def last_run(mask: list[int]) -> list[int]:
    """Keep only the last run of consecutive 1s (the last assistant turn); zeros elsewhere."""
    end = len(mask) - mask[::-1].index(1) if 1 in mask else 0
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]


def encode_chat(
    tokenizer,
    messages: list[Message],
    max_length: int,
    train_on_prompt: bool = False,
    train_on_all_assistant_turns: bool = True,
) -> dict[str, Any]:
    """Tokenize one conversation into `input_ids` and `labels` (both length T <= max_length).

    Assistant turns before the first user turn are dropped (`formats.drop_opening_turns`). The
    assistant mask comes from the template's generation markers when it has them
    (`generation_mask`), else from character offsets (`offset_mask`).

    Args:
        train_on_prompt: label every token, prompt included.
        train_on_all_assistant_turns: label every assistant turn; False labels only the last one.

    Returns:
        dict with `input_ids: list[int]`, `labels: list[int]` (-100 on non-trained tokens),
        `truncated: bool`, `prompt_length` (tokens before the first label) and `full_length`
        (both before truncation), and `opening_turns_dropped`.
    """
    messages, opening = drop_opening_turns(messages)
    masked_by = generation_mask if has_generation_markers(tokenizer) else offset_mask
    ids, mask = masked_by(tokenizer, messages)
    if not train_on_all_assistant_turns:
        mask = last_run(mask)
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
    return {
        "input_ids": ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(ids) > max_length,
        "prompt_length": next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(ids)),
        "full_length": len(ids),
        "opening_turns_dropped": opening,
    }


def chunk_tokens(
    ids: list[int], block_size: int, stride: int = 0, keep_tail: bool = False
) -> tuple[list[dict], int]:
    """Cut one token stream into `block_size` windows that overlap by `stride` tokens.

    The first `stride` labels of every window after the first are -100: those tokens were
    predicted by the window before and serve as context here. Windows start every
    `block_size - stride` tokens; the tail after the last full window is dropped (and counted),
    or kept as a shorter window with `keep_tail`.

    Returns:
        (windows as `{"input_ids", "labels"}` dicts, number of dropped tail tokens).
    """
    step, chunks, start = block_size - stride, [], 0

    def window(a: int, b: int) -> dict:
        labels = list(ids[a:b])
        if a > 0:
            labels[:stride] = [IGNORE_INDEX] * min(stride, len(labels))
        return {"input_ids": list(ids[a:b]), "labels": labels}

    while start + block_size <= len(ids):
        chunks.append(window(start, start + block_size))
        start += step
    covered = start - step + block_size if chunks else 0
    if covered >= len(ids):
        return chunks, 0
    if keep_tail:
        return chunks + [window(start, len(ids))], 0
    return chunks, len(ids) - covered


def _row(
    input_ids=(),
    labels=(),
    truncated=False,
    skip="",
    dropped=0,
    prompt_length=0,
    full_length=None,
    note="",
    row=0,
) -> dict[str, Any]:
    # Position 0's label is never a target after the causal shift, so it does not count.
    n_labels = sum(t != IGNORE_INDEX for t in labels[1:])
    if not skip and n_labels == 0:
        skip = "no_labels_after_truncation" if truncated else "no_labels"
    return {
        "input_ids": list(input_ids),
        "labels": list(labels),
        "length": len(input_ids),
        "n_labels": n_labels,
        "truncated": truncated,
        "skip": skip,
        "dropped": dropped,
        "prompt_length": prompt_length,
        "full_length": len(input_ids) if full_length is None else full_length,
        "note": note,
        "row": row,
    }


def encode_chat_row(
    row: dict, convert, tokenizer, max_length: int, row_key: str | None = None, **masking
) -> dict[str, Any]:
    """`datasets.map` function for chat formats: one row -> one tokenized example (or a skip).

    Raises:
        RowError: the row cannot be rendered (a template's own error, say), with its `row_key`
            field (1-based row number; 0 when it has none), so the data module names its line.
    """
    number = row[row_key] if row_key and row_key in row else 0
    try:
        ex = encode_chat(tokenizer, convert(row), max_length, **masking)
    except Skip as s:
        return _row(skip=s.args[0], row=number)
    except Exception as e:  # jinja2, transformers or our own errors: say which row
        raise RowError(number, f"cannot be encoded: {type(e).__name__}: {e}") from e
    note = "dropped_opening_assistant_turn" if ex["opening_turns_dropped"] else ""
    return _row(
        ex["input_ids"],
        ex["labels"],
        ex["truncated"],
        prompt_length=ex["prompt_length"],
        full_length=ex["full_length"],
        note=note,
        row=number,
    )


def encode_text_batch(
    rows: dict[str, list],
    convert,
    tokenizer,
    block_size: int,
    stride: int,
    keep_boundaries: bool,
    row_key: str | None = None,
) -> dict[str, list]:
    """Batched `datasets.map` function for `text`: documents -> chunks, eos after each document.

    Without `keep_boundaries` the documents of one batch (1,000 rows, as in transformers'
    run_clm.py `group_texts`) are concatenated before chunking, so a batch's tail is dropped.
    A skipped document keeps its `row_key` number (a chunk has none: 0).
    """
    out, texts = [], []
    for i in range(len(next(iter(rows.values())))):
        try:
            texts.append(convert({k: v[i] for k, v in rows.items()}))
        except Skip as s:
            out.append(_row(skip=s.args[0], row=rows[row_key][i] if row_key in rows else 0))
    eos = [tokenizer.eos_token_id]
    docs = (
        [d + eos for d in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    )
    streams = docs if keep_boundaries else [[t for d in docs for t in d]]
    for ids in streams:
        chunks, dropped = chunk_tokens(ids, block_size, stride, keep_tail=keep_boundaries)
        out += [_row(c["input_ids"], c["labels"]) for c in chunks]
        if dropped:
            out.append(_row(skip="tail", dropped=dropped))
    return {k: [r[k] for r in out] for k in FEATURES}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of everything about a tokenizer that changes its output."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)  # call-time settings, not identity
    state.pop("padding", None)
    extra = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map]
    text = json.dumps([state, extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def right_padding(tokenizer):
    """The tokenizer, or a shallow copy of it that pads on the right (with eos when it has no
    pad token).

    transformers' collators pad on the tokenizer's `padding_side`; training batches are right
    padded, and the run's own tokenizer (saved with the adapter) is left as it is. Padding with
    eos leaves the real end-of-turn / eos tokens supervised: the collator puts -100 on padding
    positions (by length, not by token id), so the model still learns to stop.
    """
    if tokenizer.pad_token_id is None:  # a deep copy: special tokens are shared by copy.copy
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.padding_side == "right":
        return tokenizer
    else:
        tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def lm_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """transformers' collator for `{"input_ids", "labels"}` examples: right-pads to the longest
    one, rounded up to a multiple of 8, into (B, T) long tensors `input_ids` (pad id on padding),
    `attention_mask` (1 on real tokens) and `labels` (-100 on padding)."""
    return DataCollatorForSeq2Seq(
        right_padding(tokenizer), label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
    )
