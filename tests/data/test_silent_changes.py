"""Inputs that used to change the data silently or stop a run without naming it: a conversation
opening with an assistant turn, CSV cells re-typed by pandas, empty answers, answers cut away by
`max_length`, and the pad token in use."""

import copy
import json
import logging
from pathlib import Path

import pytest

from lorafit.data.encoding import IGNORE_INDEX, encode_chat
from lorafit.data.formats import DataError
from lorafit.data.lm import ChatDataModule
from lorafit.data.sources import load_splits, read_table

GREETING = "Hello! I am the support bot. How can I help you today?"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def module(tok, tmp_path, path, **kwargs) -> ChatDataModule:
    kw = dict(source="datasets", path=str(path), cache_dir=str(tmp_path / "cache"))
    return ChatDataModule(tok, **{**kw, "val_examples": 1, "num_samples": 1, **kwargs})


def labelled(tok, ex) -> str:
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def both_splits(dm) -> list[dict]:
    return [*dm.train_set, *dm.val_set]


# -------------------------------------------------------------------------------------------------
# 1. A conversation that opens with an assistant turn (a bot greeting)


def test_opening_assistant_turn_is_dropped_and_the_rest_trains(smol_tokenizer):
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "A low-rank update."},
    ]
    ex = encode_chat(smol_tokenizer, chat, max_length=512)
    assert labelled(smol_tokenizer, ex) == "A low-rank update.<|im_end|>"  # not the greeting
    assert ex["opening_turns_dropped"] == 1
    text = smol_tokenizer.decode(ex["input_ids"])
    assert "Be terse." in text and "What is LoRA?" in text and "support bot" not in text


def test_sharegpt_file_opening_with_a_greeting_trains(smol_tokenizer, tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "gpt", "value": GREETING},
                {"from": "human", "value": f"Q{i}?"},
                {"from": "gpt", "value": f"A{i}."},
            ]
        }
        for i in range(4)
    ]
    # Only the greeting answers nothing: no assistant turn is left to train on.
    greeting_only = [{"from": "gpt", "value": GREETING}, {"from": "human", "value": "Hi"}]
    rows.append({"conversations": greeting_only})
    dm = module(smol_tokenizer, tmp_path, jsonl(tmp_path / "sharegpt.jsonl", rows))
    dm.setup()
    assert dm.stats["format"] == "sharegpt" and dm.stats["examples_read"] == 5
    assert dm.stats["skipped_no_assistant_turn"] == 1
    kept = both_splits(dm)
    assert len(kept) == 4 and dm.stats["dropped_opening_assistant_turn"] == 4
    for ex in kept:
        answer = labelled(smol_tokenizer, ex)
        assert answer == f"A{answer[1]}.<|im_end|>"  # the answer only, not the greeting
        assert "support bot" not in smol_tokenizer.decode(ex["input_ids"])
    for prompt, _ in dm.sample_prompts:  # held-out prompts start at the first user turn too
        assert [m["role"] for m in prompt] == ["user"]


def test_a_row_that_cannot_be_rendered_is_named(smol_tokenizer, tmp_path):
    template = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows = [{"prompt": p, "completion": "A."} for p in ("Q1?", "Q2?", "boom", "Q4?")]
    tok = copy.copy(smol_tokenizer)  # the data module sets the template; keep the session's
    dm = module(tok, tmp_path, jsonl(tmp_path / "qa.jsonl", rows), template=template)
    with pytest.raises(DataError, match=r"qa.jsonl line 3: cannot be encoded.*no boom"):
        dm.setup()


# -------------------------------------------------------------------------------------------------
# 2. Cells are text, as written; an empty answer is skipped and counted

ALPACA_CSV = """instruction,input,output
Add 5 and 7,,12
Halve 3,,1.50
Say the word null,,null
Say NA,as text,NA
Leave it blank,,
Spell zero zero seven,,007
"""
ANSWERS = ["12", "1.50", "null", "NA", "", "007"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_cells_are_read_as_written(tmp_path, suffix):
    text = ALPACA_CSV if suffix == ".csv" else ALPACA_CSV.replace(",", "\t")
    rows = load_splits(str(write(tmp_path / f"alpaca{suffix}", text)))["train"]
    assert {str(v) for v in rows.features.values()} == {"Value('string')"}
    assert rows["output"] == ANSWERS
    assert rows["input"] == ["", "", "", "as text", "", ""]


def test_csv_answers_train_as_written_and_empty_ones_are_skipped(smol_tokenizer, tmp_path):
    dm = module(smol_tokenizer, tmp_path, write(tmp_path / "alpaca.csv", ALPACA_CSV))
    dm.setup()
    assert dm.stats["format"] == "alpaca" and dm.stats["examples_read"] == 6
    assert dm.stats["skipped_empty_answer"] == 1
    answers = {labelled(smol_tokenizer, ex) for ex in both_splits(dm)}
    assert answers == {f"{a}<|im_end|>" for a in ANSWERS if a}
    texts = [smol_tokenizer.decode(ex["input_ids"]) for ex in both_splits(dm)]
    assert any("Say NA\n\nas text" in t for t in texts)  # the `input` cell after a blank line


def test_empty_answers_in_chat_rows_are_skipped_and_counted(smol_tokenizer, tmp_path):
    def chat(answer):
        turns = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer}]
        return {"messages": turns}

    rows = [chat(f"A{i}.") for i in range(6)] + [chat(""), chat("  \n")]
    rows.append({"messages": [*chat("A.")["messages"], *chat("")["messages"]]})  # a later turn
    path = jsonl(tmp_path / "chats.jsonl", rows)
    dm = module(smol_tokenizer, tmp_path, path, val_examples=4)  # one answered row held out
    dm.setup()
    assert dm.stats["skipped_empty_answer"] == 3
    assert dm.stats["train_examples"] + dm.stats["val_examples"] == 6


def test_classification_table_text_is_read_as_written(tmp_path):
    csv = write(tmp_path / "x.csv", "text,label\nNA,0\n12.50,1\nnull,1\n,0\n")
    texts, labels, skipped = read_table(csv, "text", "label", "data.path")
    assert texts == ["NA", "12.50", "null"] and labels == [0, 1, 1]
    assert skipped == {"skipped_empty_text": 1}
    csv = write(tmp_path / "y.csv", "text,label\na,007\nb,7\nc,\n")  # not re-typed, not merged
    texts, labels, skipped = read_table(csv, "text", "label", "data.path")
    assert labels == ["007", "7"] and skipped == {"skipped_missing_label": 1}


# -------------------------------------------------------------------------------------------------
# 3. Answers cut away by max_length: a warning naming the rows; an error naming data.max_length


def qa_rows(n: int, long_rows: tuple[int, ...] = ()) -> list[dict]:
    """n prompt/completion rows; the 1-based rows in `long_rows` have a ~200-token prompt, and
    each row's prompt is a little longer than the one before."""
    long = "Read this twice: " + "the quick brown fox jumps over the lazy dog " * 20
    prompts = [(long if i + 1 in long_rows else "") + f"Q{i}?" + " Why?" * i for i in range(n)]
    return [{"prompt": p, "completion": "A."} for p in prompts]


def test_answers_cut_away_are_named_in_one_warning(smol_tokenizer, tmp_path, caplog):
    path = jsonl(tmp_path / "qa.jsonl", qa_rows(8, long_rows=(2, 5)))
    dm = module(smol_tokenizer, tmp_path, path, max_length=64)
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        dm.setup()
    assert dm.stats["skipped_no_labels_after_truncation"] == 2
    warnings = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(warnings) == 1
    assert "data.max_length=64" in warnings[0] and "2 rows" in warnings[0]
    assert "qa.jsonl lines 2, 5" in warnings[0]


def test_every_answer_cut_away_is_an_error_naming_max_length(smol_tokenizer, tmp_path):
    rows = qa_rows(4)
    prompts = []
    for r in rows:
        chat = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "x"}]
        labels = encode_chat(smol_tokenizer, chat, max_length=512)["labels"]
        prompts.append(next(i for i, t in enumerate(labels) if t != IGNORE_INDEX))
    assert min(prompts) > 32  # SmolLM2's default system message alone is 21 tokens
    path = jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError) as e:
        module(smol_tokenizer, tmp_path, path, max_length=32).setup()
    msg = str(e.value)
    assert "data.max_length=32" in msg and "val_fraction" not in msg
    assert "4 rows" in msg and f"{min(prompts)} to {max(prompts)} tokens" in msg
    assert f"at least {max(prompts) + 1}" in msg
    dm = module(smol_tokenizer, tmp_path, path, max_length=max(prompts) + 1)  # the advice works
    dm.setup()
    assert "skipped_no_labels_after_truncation" not in dm.stats
    assert dm.stats["train_examples"] + dm.stats["val_examples"] == 4 and dm.stats["truncated"]


# -------------------------------------------------------------------------------------------------
# 4. The pad token in use is logged once


def test_pad_token_is_logged_once(smol_tokenizer, tmp_path, caplog):
    path = jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    dm = module(smol_tokenizer, tmp_path, path)
    with caplog.at_level(logging.INFO, logger="lorafit"):
        dm.setup()
        dm.setup()
    pads = [r.getMessage() for r in caplog.records if "pad token" in r.getMessage().lower()]
    assert len(pads) == 1
    assert "'<|im_end|>' (id 2)" in pads[0] and "same as eos" in pads[0]
