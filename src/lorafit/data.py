"""Chat data: read conversations, render them with the chat template, mask, split, batch.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages. Each one
becomes one training example: the whole conversation rendered by the tokenizer's chat template, with
labels on the assistant turns only (prompt tokens get -100, the ignore index of `F.cross_entropy`).
Assistant spans are found from character offsets of the rendered text, not by searching for marker
token ids, so any template that renders prefixes consistently works.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from lorafit.models import package_file

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Message = dict[str, str]

# ChatML, used only when a tokenizer ships no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DataError(ValueError):
    """Bad data input; the message names the file (and line) or config key to fix."""


# ---------------------------------------------------------------------------------------------------
# Sources: each returns (conversations, Counter of skipped-by-reason)


def _pair_up(turns: list[str]) -> list[Message]:
    """Alternate user/assistant over a list of strings; a trailing unanswered user turn is dropped."""
    turns = turns[: len(turns) - len(turns) % 2]
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": str(t)} for i, t in enumerate(turns)]


def load_chatterbot(language: str = "english") -> tuple[list[list[Message]], Counter]:
    """Read every conversation of one language from the `chatterbot-corpus` package's YAML files.

    Each YAML conversation is a list of alternating user/assistant strings (multi-turn kept); an entry
    that is a single string or has no answer turn is skipped and counted as `no_assistant_turn`.

    Raises:
        DataError: the language folder does not exist in the package.
    """
    anchor = package_file("chatterbot-corpus", "chatterbot_corpus/__init__.py").parent
    folder = anchor / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        langs = sorted(p.name for p in (anchor / "data").iterdir() if p.is_dir())
        raise DataError(f"data.language='{language}' has no YAML files; available: {langs}")
    convs, skipped = [], Counter()
    for f in files:
        for entry in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            msgs = _pair_up(entry) if isinstance(entry, list) else []
            if msgs:
                convs.append(msgs)
            else:
                skipped["no_assistant_turn"] += 1
    return convs, skipped


def load_jsonl_messages(path: str | Path) -> tuple[list[list[Message]], Counter]:
    """Read a JSONL file of `{"messages": [{"role": ..., "content": ...}, ...]}` lines.

    Blank lines are ignored; a conversation without an assistant turn is skipped and counted.

    Raises:
        DataError: the file is missing (names `data.path`), or a line is not JSON / lacks a
            `messages` list of role/content objects (names file and line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.path='{path}' does not exist. Point it at a JSONL file with one "
            '{"messages": [{"role": "user", "content": ...}, ...]} object per line.'
        )
    convs, skipped = [], Counter()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            ok = isinstance(msgs, list) and all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs
            )
            if not ok:
                raise DataError(
                    f"{path}:{lineno}: expected an object with a 'messages' list of "
                    "{'role', 'content'} objects."
                )
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
            if any(m["role"] == "assistant" for m in msgs):
                convs.append(msgs)
            else:
                skipped["no_assistant_turn"] += 1
    return convs, skipped


# ---------------------------------------------------------------------------------------------------
# Rendering and masking


def render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template (ChatML when it has none)."""
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
                "(for example ChatML)."
            )
        spans.append((start, len(upto.rstrip())))
    return text, spans


def encode_chat(
    tokenizer, messages: list[Message], max_length: int, train_on_prompt: bool = False
) -> dict[str, Any]:
    """Tokenize one conversation into `input_ids` and `labels` (both length T <= max_length).

    Returns:
        dict with `input_ids: list[int]`, `labels: list[int]` (-100 on non-trained tokens) and
        `truncated: bool`.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [
            tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX
            for tok, (a, _) in zip(ids, offsets, strict=True)
        ]
    return {
        "input_ids": ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(ids) > max_length,
    }


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one. Returns (B, T) long tensors."""
    width = max(len(ex["input_ids"]) for ex in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
        "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(ex["labels"])
    return out


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbours have similar lengths, so batches carry little padding.

    Indices are shuffled (seed + epoch), cut into chunks of `group` indices, and each chunk is sorted
    by length; the idea of transformers' `group_by_length`. Lightning wraps it for DDP.
    """

    def __init__(self, lengths: list[int], group: int, seed: int):
        self.lengths, self.group, self.seed, self.epoch = lengths, group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        idx = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(idx)
        for i in range(0, len(idx), self.group):
            yield from sorted(idx[i : i + self.group], key=lambda j: -self.lengths[j])


class ChatDataModule(L.LightningDataModule):
    """Conversations -> masked, tokenized train/validation batches.

    Args:
        tokenizer: a fast Hugging Face tokenizer (character offsets are needed for masking).
        source: `chatterbot` (built-in corpus) or `jsonl` (a local `messages` JSONL at `path`).
        path: JSONL file for `source: jsonl`.
        language: chatterbot corpus language folder.
        max_length: tokens per example; longer ones are truncated and counted.
        val_fraction: share of conversations held out for validation (deterministic, by `seed`).
        batch_size: training examples per batch; `eval_batch_size` for validation.
        train_on_prompt: put labels on prompt tokens too (default: assistant turns only).
        max_train_examples: cap the training split (after the split), e.g. for quick runs.
        num_samples: held-out prompts kept for the base-vs-tuned `samples.jsonl`.
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        tokenizer,
        source: str = "chatterbot",
        path: str | None = None,
        language: str = "english",
        max_length: int = 256,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        train_on_prompt: bool = False,
        max_train_examples: int | None = None,
        num_samples: int = 5,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1.")
        self.tokenizer = tokenizer
        self.source, self.path, self.language = source, path, language
        self.max_length, self.val_fraction, self.seed = max_length, val_fraction, seed
        self.batch_size, self.eval_batch_size, self.num_workers = (
            batch_size,
            eval_batch_size,
            num_workers,
        )
        self.train_on_prompt, self.max_train_examples = train_on_prompt, max_train_examples
        self.num_samples = num_samples
        self.stats: dict[str, int] = {}
        self.train_set: list[dict] | None = None

    def load_conversations(self) -> tuple[list[list[Message]], Counter]:
        if self.source == "chatterbot":
            return load_chatterbot(self.language)
        if self.source == "jsonl":
            if not self.path:
                raise DataError("data.path is not set; give a JSONL file: data.path=/path/x.jsonl")
            return load_jsonl_messages(self.path)
        raise DataError(f"data.source='{self.source}' is unknown; use 'chatterbot' or 'jsonl'.")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        convs, skipped = self.load_conversations()
        order = list(range(len(convs)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, round(len(convs) * self.val_fraction))
        if len(convs) - n_val < 1:
            raise DataError(f"Only {len(convs)} usable conversations: too few to split.")
        val_convs = [convs[i] for i in order[:n_val]]
        train_convs = [convs[i] for i in order[n_val:]][: self.max_train_examples]
        # Held-out prompts for samples.jsonl: everything before a validation conversation's last
        # assistant turn, with that turn as the reference answer.
        self.sample_prompts = []
        for msgs in val_convs[: self.num_samples]:
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            self.sample_prompts.append((msgs[:last], msgs[last]["content"]))
        counts = Counter({f"skipped_{k}": v for k, v in skipped.items()})
        self.train_set = self._encode(train_convs, counts)
        self.val_set = self._encode(val_convs, counts)
        self.stats = {
            "conversations_read": len(convs) + sum(skipped.values()),
            "train_examples": len(self.train_set),
            "val_examples": len(self.val_set),
            "train_tokens": sum(len(ex["input_ids"]) for ex in self.train_set),
            "train_supervised_tokens": sum(
                sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in self.train_set
            ),
            **dict(sorted(counts.items())),
        }
        log.info("Data: %s", self.stats)

    def _encode(self, convs: list[list[Message]], counts: Counter) -> list[dict]:
        out = []
        for msgs in convs:
            ex = encode_chat(self.tokenizer, msgs, self.max_length, self.train_on_prompt)
            counts["truncated"] += ex["truncated"]  # counted, still used
            if all(t == IGNORE_INDEX for t in ex["labels"][1:]):
                counts["skipped_no_labels_after_truncation"] += 1
                continue
            out.append(ex)
        return out

    def _loader(self, data: list[dict], batch_size: int, sampler=None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=lambda b: collate(b, pad),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        lengths = [len(ex["input_ids"]) for ex in self.train_set]
        sampler = LengthGroupedSampler(lengths, group=self.batch_size * 16, seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)
