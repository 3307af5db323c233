"""The reader layer (`lorafit.data.reader`): encodings, byte order marks, file and line of every
row, null / missing / non-string fields, the one skip log, empty data, padding without a pad token
and chat data without a chat template."""

import json
import logging
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorafit.data.encoding import IGNORE_INDEX, lm_collator
from lorafit.data.formats import DataError
from lorafit.data.lm import ChatDataModule
from lorafit.data.reader import FileRows, Locator, decode, record_lines
from lorafit.data.sources import read_splits, read_table
from tiny_runs import EXACT, save_tiny_smol, train_run


@pytest.fixture
def tok(smol_dir):
    """A fresh SmolLM2 tokenizer (the data module sets its chat template; tests change others)."""
    return AutoTokenizer.from_pretrained(smol_dir)


def qa(i: int, **fields) -> dict:
    return {"prompt": f"Q{i}?", "completion": f"A{i}.", **fields}


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def module(tok, tmp_path, path: Path, **kwargs) -> ChatDataModule:
    kw = dict(source="datasets", path=str(path), cache_dir=str(tmp_path / "cache"))
    return ChatDataModule(tok, **{**kw, "val_examples": 1, "num_samples": 0, **kwargs})


# -------------------------------------------------------------------------------------------------
# Bytes


def test_non_utf8_names_file_line_and_byte_offset(tok, tmp_path):
    head = jsonl_bytes([qa(0), qa(1)])
    bad = b'{"prompt": "caf\xe9?", "completion": "x"}\n'
    path = tmp_path / "qa.jsonl"
    path.write_bytes(head + bad + jsonl_bytes([qa(3)]))
    offset = len(head) + bad.index(b"\xe9")
    with pytest.raises(DataError) as e:
        module(tok, tmp_path, path).setup()
    assert f"qa.jsonl line 3, byte offset {offset}: b'\\xe9' is not valid utf-8" in str(e.value)
    assert "data.encoding" in str(e.value) and "data.encoding_errors=replace" in str(e.value)
    # A byte order mark counts in the offset (it is a byte of the file) but not as a line.
    path.write_bytes(b"\xef\xbb\xbf" + head + bad)
    with pytest.raises(DataError, match=f"line 3, byte offset {offset + 3}:"):
        module(tok, tmp_path, path).setup()


def test_a_folder_goes_through_the_reader_file_by_file(tmp_path):
    """`data.path=FOLDER`: its files by split as `datasets` names them, each decoded and located
    like a single file (a folder used to go to `load_dataset` whole, past the reader)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl_bytes([qa(0), qa(1)]))
    (folder / "test.jsonl").write_bytes(b'{"prompt": "caf\xe9?", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"test.jsonl line 1, byte offset 15: b'\\xe9'"):
        read_splits(str(folder), cache_dir=str(tmp_path / "cache"))
    read = read_splits(str(folder), cache_dir=str(tmp_path / "cache"), encoding="latin-1")
    assert sorted(read.splits) == ["test", "train"] and read.splits["test"]["prompt"] == ["café?"]


def test_encoding_errors_replace_counts_lines_and_encoding_decodes(tok, tmp_path):
    rows = jsonl_bytes([qa(i) for i in range(4)])
    bad = b'{"prompt": "caf\xe9 cr\xe8me?", "completion": "na\xefve."}\n'  # three bytes, one line
    path = tmp_path / "latin.jsonl"
    path.write_bytes(rows + bad + bad)
    dm = module(tok, tmp_path, path, encoding_errors="replace")
    dm.setup()
    assert dm.stats["decoded_replaced_lines"] == 2 and dm.stats["examples_read"] == 6
    texts = [tok.decode(ex["input_ids"]) for ex in [*dm.train_set, *dm.val_set]]
    assert sum("caf\ufffd cr\ufffdme?" in t for t in texts) == 2
    dm = module(tok, tmp_path, path, encoding="latin-1")  # the file's real encoding
    dm.setup()
    texts = [tok.decode(ex["input_ids"]) for ex in [*dm.train_set, *dm.val_set]]
    assert sum("café crème?" in t for t in texts) == 2
    assert "decoded_replaced_lines" not in dm.stats
    with pytest.raises(DataError, match="data.encoding='klingon'"):
        module(tok, tmp_path, path, encoding="klingon").setup()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
def test_a_byte_order_mark_is_read_transparently(tmp_path, suffix):
    rows = [qa(0), qa(1)]
    text = {
        ".jsonl": jsonl_bytes(rows).decode(),
        ".json": json.dumps(rows),
        ".csv": "prompt,completion\nQ0?,A0.\nQ1?,A1.\n",
        ".tsv": "prompt\tcompletion\nQ0?\tA0.\nQ1?\tA1.\n",
        ".txt": "Q0?\nQ1?\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    read = read_splits(str(path), cache_dir=str(tmp_path / "cache"))
    rows = read.splits["train"]
    first = "text" if suffix == ".txt" else "prompt"
    assert rows.column_names[0] == first and rows[first] == ["Q0?", "Q1?"]
    assert read.counts == {"files_with_bom": 1}


# -------------------------------------------------------------------------------------------------
# Rows named by file and line


def test_record_lines_follow_blank_lines_and_quoted_newlines():
    assert record_lines('{"a": 1}\n\n  \n{"a": 2}\n', ".jsonl") == [1, 4]
    assert record_lines('[{"a": 1},\n {"a": 2}]', ".json") is None  # one JSON document
    csv = 'q,a\nQ1,"two\nlines"\n\nQ2,A2\n'
    assert record_lines(csv, ".csv") == [2, 5]
    assert record_lines("a\n\nb\n", ".txt") == [1, 2, 3]
    files = [FileRows(Path("a.jsonl"), [1, 4]), FileRows(Path("b.jsonl"), [2])]
    loc = Locator(files, 3, "data.path='*.jsonl'")
    names = ["a.jsonl line 1", "a.jsonl line 4", "b.jsonl line 2"]
    assert [loc.name(r) for r in (1, 2, 3)] == names
    assert loc.names([3, 1]) == "a.jsonl lines 1; b.jsonl lines 2"
    assert Locator(files, 7, "data.path='x'").name(5) == "data.path='x' row 5"  # counts differ


def test_missing_null_and_non_string_fields_are_skipped_by_name_and_logged_once(
    tok, tmp_path, caplog
):
    rows = [qa(i) for i in range(6)]
    rows[1] = {"prompt": "Q1?"}  # missing completion
    rows[3] = qa(3, completion=None)  # null
    rows[4] = qa(4, completion=1.50)  # a JSON number: reads as 1.5
    path = tmp_path / "qa.jsonl"
    path.write_bytes(jsonl_bytes(rows[:3]) + b"\n" + jsonl_bytes(rows[3:]))  # a blank line 4
    dm = module(tok, tmp_path, path, val_examples=2)
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        dm.setup()
    assert dm.stats["skipped_missing_completion"] == 2
    assert dm.stats["skipped_non_string_completion"] == 1
    assert dm.stats["train_examples"] + dm.stats["val_examples"] == 3
    logged = [r.getMessage() for r in caplog.records if "rows skipped" in r.getMessage()]
    assert len(logged) == 1
    assert "missing_completion 2 (" in logged[0] and "qa.jsonl lines 2, 5)" in logged[0]
    assert "non_string_completion 1 (" in logged[0] and "qa.jsonl lines 6)" in logged[0]


def test_csv_na_stays_text_and_a_short_row_is_a_counted_skip(tok, tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,output\nSay NA,NA\nQ1?,A1.\nQ2?\nQ3?,A3.\n")  # line 4: one cell
    dm = module(tok, tmp_path, path, val_examples=2)
    dm.setup()  # pandas reads the absent cell as an empty one: an empty answer
    assert dm.stats["skipped_empty_answer"] == 1 and dm.stats["examples_read"] == 4
    answers = {
        tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
        for ex in [*dm.train_set, *dm.val_set]
    }
    assert "NA<|im_end|>" in answers


def test_classification_rows_are_named_by_line(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    rows = [{"text": "a", "label": "x"}, {"text": 12, "label": "y"}, {"text": "b", "label": None}]
    rows += [{"text": "c", "label": ["x"]}, {"text": "d", "label": "y"}]
    path.write_bytes(jsonl_bytes(rows))
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        texts, labels, skipped = read_table(path, "text", "label", "data.path")
    assert texts == ["a", "d"] and labels == ["x", "y"]
    assert skipped == {
        "skipped_non_string_text": 1,
        "skipped_missing_label": 1,
        "skipped_non_scalar_label": 1,
    }
    (logged,) = [r.getMessage() for r in caplog.records if "rows skipped" in r.getMessage()]
    assert "missing_label 1 (" in logged and "x.jsonl lines 3)" in logged


def test_no_example_left_after_filtering_is_an_error(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(jsonl_bytes([{"question": f"Q{i}?", "completion": "A."} for i in range(4)]))
    with pytest.raises(DataError) as e:
        module(tok, tmp_path, path, format="prompt_completion").setup()
    msg = str(e.value)
    assert "qa.jsonl" in msg and "no training and no validation example is left" in msg
    assert "'skipped_missing_prompt': 4" in msg and "data.format / data.columns" in msg


# -------------------------------------------------------------------------------------------------
# Tokenizers: pad token, chat template


@pytest.mark.parametrize("pad", ["eos", "none"])
def test_the_end_of_turn_after_each_answer_is_supervised(tok, tmp_path, pad):
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    if pad == "none":
        tok.pad_token = None
    chats = [
        {
            "messages": [
                {"role": "user", "content": "Q?" * (i + 1)},
                {"role": "assistant", "content": f"A{i}."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No" + "." * i},
            ]
        }
        for i in range(5)
    ]
    path = tmp_path / "chats.jsonl"
    path.write_bytes(jsonl_bytes(chats))
    dm = module(tok, tmp_path, path)
    dm.setup()
    batch = lm_collator(dm.tokenizer)(list(dm.train_set))
    assert tok.pad_token_id == (None if pad == "none" else tok.eos_token_id)  # left as it was
    eos = tok.eos_token_id
    rows = zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)
    assert not batch["attention_mask"].all()  # some rows are padded
    for ids, labels, mask in rows:
        n = int(mask.sum())
        ends = [i for i in range(n) if ids[i] == eos]
        answer_ends = [i for i in ends if labels[i - 1] != IGNORE_INDEX]
        assert len(answer_ends) == 2  # one end-of-turn after each of the two answers
        assert all(labels[i] == eos for i in answer_ends)  # ... and both are supervised
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == eos).all()  # padding: not


def test_chat_data_without_a_chat_template_names_the_model_and_data_template(tok, tmp_path):
    tok.chat_template = None
    path = tmp_path / "qa.jsonl"
    path.write_bytes(jsonl_bytes([qa(i) for i in range(3)]))
    with pytest.raises(DataError) as e:
        module(tok, tmp_path, path).setup()
    assert tok.name_or_path in str(e.value) and "data.template=chatml" in str(e.value)
    dm = module(tok, tmp_path, path, template="chatml")  # the way out
    dm.setup()
    assert dm.stats["template"] == "chatml" and dm.stats["train_examples"] == 2
    text = tmp_path / "doc.txt"  # plain text needs no template
    text.write_text("one document\nanother one\n")
    module(tok, tmp_path, text, block_size=2).setup()


def test_decode_counts_replaced_lines_once_per_line():
    raw = b"ok\n\xff\xfe bad\nok\n\xff\n"
    assert decode(raw, Path("f.txt"), "utf-8", "replace", "data.path") == (
        "ok\n\ufffd\ufffd bad\nok\n\ufffd\n",
        2,
    )
    assert decode(raw, Path("f.txt"), "utf-8", "ignore", "data.path")[1] == 2


# -------------------------------------------------------------------------------------------------
# A whole run: the counts reach metrics.json's `data`


@pytest.mark.slow
def test_skips_and_decoding_are_counted_in_metrics_json(smol_tokenizer, tmp_path):
    tiny = save_tiny_smol(tmp_path / "model", smol_tokenizer)
    rows = [qa(i) for i in range(12)]
    rows[3] = qa(3, completion=None)
    path = tmp_path / "qa.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + jsonl_bytes(rows) + b'{"prompt": "caf\xe9?", "completion": "Oui."}\n'
    )
    metrics = train_run(
        tmp_path / "run",
        "model=hf",
        f"model.name_or_path={tiny}",
        "data=file",
        f"data.path={path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.encoding_errors=replace",
        "data.val_examples=2",
        "data.batch_size=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        *EXACT,
    )
    data = metrics["data"]
    assert data["examples_read"] == 13 and data["skipped_missing_completion"] == 1
    assert data["decoded_replaced_lines"] == 1 and data["files_with_bom"] == 1
    assert data["train_examples"] + data["val_examples"] == 12
    assert math.isfinite(metrics["eval_loss_after"])
