"""Data: chat rendering, label masking on SmolLM2's real template, loaders' errors, batching."""

import json

import pytest

from lorafit.data.encoding import IGNORE_INDEX, collate, encode_chat
from lorafit.data.formats import DataError
from lorafit.data.lm import ChatDataModule
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


def test_collate_pads_right_to_longest():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


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
