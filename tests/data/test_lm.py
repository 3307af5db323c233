"""Data: chat rendering, label masking on SmolLM2's real template, loaders' errors, batching."""

import copy
import json

import pytest
import torch

from lorafit.data import encoding
from lorafit.data.encoding import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    encode_chat,
    generation_mask,
    has_generation_markers,
    lm_collator,
    offset_mask,
)
from lorafit.data.formats import DataError
from lorafit.data.lm import ChatDataModule
from lorafit.data.sampling import longest_first
from lorafit.data.sources import load_chatterbot

CHAT = [
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "A low-rank update."},
    {"role": "user", "content": "Who wrote it?"},
    {"role": "assistant", "content": "Hu et al."},
]


def labelled_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def test_masking_labels_exactly_assistant_turns(smol_tokenizer):
    ex = encode_chat(smol_tokenizer, CHAT, max_length=512)
    assert len(ex["input_ids"]) == len(ex["labels"])
    # Exactly the two answers plus their end-of-turn tokens carry labels, nothing of the prompt.
    assert labelled_text(smol_tokenizer, ex) == "A low-rank update.<|im_end|>Hu et al.<|im_end|>"
    labelled = [i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in labelled)
    # The default system message inserted by SmolLM2's template is prompt, so unlabelled.
    assert "SmolLM" in smol_tokenizer.decode(ex["input_ids"])


def test_train_on_prompt_labels_every_token(smol_tokenizer):
    ex = encode_chat(smol_tokenizer, CHAT, max_length=512, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_truncation_is_reported(smol_tokenizer):
    ex = encode_chat(smol_tokenizer, CHAT, max_length=10)
    assert len(ex["input_ids"]) == 10 and ex["truncated"]


def test_chatterbot_corpus_reads_real_conversations():
    convs, skipped = load_chatterbot("english")
    assert len(convs) + skipped["duplicate"] + skipped["no_assistant_turn"] == 2026
    assert len(convs) == 898  # the English corpus repeats 1,127 of its dialogues
    texts = [tuple(m["content"] for m in c) for c in convs]
    assert len(set(texts)) == len(texts)  # no dialogue on both sides of the train/val split
    assert skipped["no_assistant_turn"] >= 1  # a trivia entry is a lone string
    assert any(len(c) > 2 for c in convs)  # multi-turn kept
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)


def test_chatterbot_unknown_language_lists_choices():
    with pytest.raises(DataError, match="english"):
        load_chatterbot("klingon")


def jsonl_module(tok, tmp_path, rows_text: str, **kwargs) -> ChatDataModule:
    p = tmp_path / "chats.jsonl"
    p.write_text(rows_text)
    kw = dict(source="jsonl", path=str(p), cache_dir=str(tmp_path / "cache"), num_samples=0)
    return ChatDataModule(tok, **{**kw, **kwargs})


def test_jsonl_errors_name_the_file(smol_tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    dm = jsonl_module(smol_tokenizer, tmp_path, json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"chats.jsonl line 2: not valid JSON .*column 2"):
        dm.setup()
    dm = jsonl_module(smol_tokenizer, tmp_path, json.dumps(good) + "\n\n" + '["a list"]\n')
    with pytest.raises(DataError, match=r"chats.jsonl line 3: a JSON list, not an object"):
        dm.setup()
    dm = ChatDataModule(smol_tokenizer, source="jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"data.path='.*missing.jsonl' does not exist"):
        dm.setup()
    with pytest.raises(DataError, match="data.path is not set"):
        ChatDataModule(smol_tokenizer, source="jsonl").setup()


def test_jsonl_skips_conversations_without_answer(smol_tokenizer, tmp_path):
    answered = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]
    }
    rows = [answered] * 3 + [{"messages": [{"role": "user", "content": "unanswered"}]}]
    rows += [{"text": "a row of another shape"}]  # no `messages`: skipped, counted
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    dm = jsonl_module(smol_tokenizer, tmp_path, text, format="messages", val_examples=1)
    dm.setup()
    assert dm.stats["examples_read"] == 5
    assert dm.stats["skipped_no_assistant_turn"] == 1
    assert dm.stats["skipped_missing_messages"] == 1
    assert dm.stats["train_examples"] + dm.stats["val_examples"] == 3
    assert "be brief" in smol_tokenizer.decode(dm.train_set[0]["input_ids"])


def test_lm_collator_pads_right_to_a_multiple_of_8(smol_tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    pad = smol_tokenizer.pad_token_id
    batch = lm_collator(smol_tokenizer)(rows)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert all(v.dtype == torch.long and v.shape == (2, 8) for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [pad] * 5, [8] + [pad] * 7]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] + [0] * 7]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [8] + [-100] * 7]
    nine = {"input_ids": list(range(9)), "labels": list(range(9))}
    assert lm_collator(smol_tokenizer)([nine])["input_ids"].shape == (1, 16)
    # A tokenizer set to pad on the left still gives right-padded batches, and is left as it is.
    left = copy.copy(smol_tokenizer)
    left.padding_side = "left"
    assert lm_collator(left)(rows)["input_ids"][1, 0] == 8 and left.padding_side == "left"


# ChatML (the same text as CHATML_TEMPLATE) with each answer and its end-of-turn marker inside
# `{% generation %}`, the newline after it outside: the span the offset method labels.
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_generation_markers_mask_equals_offset_mask(smol_tokenizer, monkeypatch):
    assert not has_generation_markers(smol_tokenizer)  # SmolLM2's own: the offset method
    tok = copy.copy(smol_tokenizer)  # the session tokenizer keeps its template
    tok.chat_template = CHATML_GENERATION
    assert has_generation_markers(tok)
    convs, _ = load_chatterbot("english")
    convs = [c for c in convs if len(c) > 2][:40] + convs[:20]  # multi-turn first
    system = [{"role": "system", "content": "Be terse."}]
    convs += [
        CHAT,
        system + CHAT,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " x "}],
    ]
    for conv in convs:
        assert tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
            conv, tokenize=False, chat_template=CHATML_TEMPLATE
        )
        ids, mask = generation_mask(tok, conv)
        assert (ids, mask) == offset_mask(tok, conv)
        assert sum(mask) > 0
    # encode_chat takes the generation path here (the offset one would fail) with equal labels.
    offsets = copy.copy(smol_tokenizer)
    offsets.chat_template = CHATML_TEMPLATE
    expected = [
        [encode_chat(offsets, c, 512, train_on_all_assistant_turns=every) for c in convs]
        for every in (True, False)
    ]
    monkeypatch.setattr(encoding, "offset_mask", None)
    got = [
        [encode_chat(tok, c, 512, train_on_all_assistant_turns=every) for c in convs]
        for every in (True, False)
    ]
    assert got == expected
    assert labelled_text(tok, got[0][-3]) == "A low-rank update.<|im_end|>Hu et al.<|im_end|>"
    assert labelled_text(tok, got[1][-3]) == "Hu et al.<|im_end|>"


def test_split_is_deterministic_and_disjoint(smol_tokenizer):
    def split(seed):
        dm = ChatDataModule(smol_tokenizer, max_train_examples=None, seed=seed, num_samples=2)
        dm.setup()
        return dm

    a, b, c = split(1), split(1), split(2)
    ids = lambda d: {tuple(x["input_ids"]) for x in d}  # noqa: E731
    assert ids(a.val_set) == ids(b.val_set)
    assert ids(a.val_set) != ids(c.val_set)
    assert len(a.train_set) + len(a.val_set) == len(c.train_set) + len(c.val_set)
    assert not ids(a.val_set) & ids(a.train_set)  # held out for real (duplicates removed)
    assert len(a.val_set) == pytest.approx(0.05 * (len(a.train_set) + len(a.val_set)), abs=2)
    assert a.stats["train_examples"] == len(a.train_set)
    assert len(a.sample_prompts) == 2
    batch = next(iter(a.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    # transformers' collator: the rows' values on real positions, padding after them; the
    # validation loader goes longest first (fewer padded positions), which changes no mean.
    batch, rows = next(iter(a.val_dataloader())), list(longest_first(a.val_set))[:16]
    lengths = [len(r["input_ids"]) for r in longest_first(a.val_set)]
    assert lengths == sorted(lengths, reverse=True) and sorted(lengths) != lengths
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["input_ids"].shape[1] - 8 < max(len(r["input_ids"]) for r in rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
