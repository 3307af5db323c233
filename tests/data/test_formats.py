"""Data formats: loading each file type through `datasets`, converters, auto detection, templates,
text chunking, the tokenization cache, and one end-to-end run per format on the built-in model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from lorafit.data.encoding import ALPACA_TEMPLATE, IGNORE_INDEX, chunk_tokens, encode_chat
from lorafit.data.formats import DataError, detect_format, get_field, make_converter
from lorafit.data.lm import ChatDataModule

N = 6  # rows per file: Q{i}? -> A{i}.


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as the file type the suffix names (real-shaped files, as users have them)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        cols = list(rows[0])
        lines = [sep.join(cols)] + [sep.join(str(r[c] or "") for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    return path


def rows_for(fmt: str) -> list[dict]:
    """N rows of one format; row i asks `Q{i}?` and answers `A{i}.`."""
    if fmt == "messages":
        return [
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": f"Q{i}?"},
                    {"role": "assistant", "content": f"A{i}."},
                ]
            }
            for i in range(N)
        ]
    if fmt == "sharegpt":
        return [
            {
                "conversations": [
                    {"from": "human", "value": f"Q{i}?"},
                    {"from": "gpt", "value": f"A{i}."},
                ]
            }
            for i in range(N)
        ]
    if fmt == "alpaca":
        return [{"instruction": f"Q{i}?", "input": "", "output": f"A{i}."} for i in range(N)]
    if fmt == "prompt_completion":
        return [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(N)]
    if fmt == "columns":
        return [{"id": i, "instances": [{"input": f"Q{i}?", "output": f"A{i}."}]} for i in range(N)]
    return [{"text": f"Document {i} says Q{i}? and then A{i}. The end."} for i in range(N)]


FILES = {
    "messages": "chats.jsonl",
    "sharegpt": "sharegpt.json",
    "alpaca": "alpaca.csv",
    "prompt_completion": "pc.parquet",
    "columns": "nested.json",
    "text": "corpus.txt",
}
COLUMNS = {"prompt": "instances[0].input", "response": "instances[0].output"}


@pytest.fixture
def tok(smol_dir):
    """A fresh SmolLM2 tokenizer: the data module sets its chat_template, so none is shared."""
    return AutoTokenizer.from_pretrained(smol_dir)


def module(tok, tmp_path, path, **kwargs) -> ChatDataModule:
    kw = dict(source="datasets", path=str(path), cache_dir=str(tmp_path / "cache"))
    return ChatDataModule(tok, **{**kw, "val_examples": 1, "num_samples": 1, **kwargs})


def labelled(tok, ex) -> str:
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize("fmt", list(FILES))
def test_each_format_loads_detects_and_masks(tok, tmp_path, fmt):
    path = write_rows(tmp_path / FILES[fmt], rows_for(fmt))
    columns = COLUMNS if fmt == "columns" else None
    dm = module(tok, tmp_path, path, columns=columns, block_size=16)
    dm.setup()
    assert dm.stats["format"] == fmt  # auto detection (`columns` given -> columns)
    assert dm.stats["examples_read"] == N
    if fmt == "text":
        # 16-token chunks of the concatenated documents, every token a label.
        assert all(len(ex["input_ids"]) == 16 for ex in dm.train_set)
        assert all(ex["labels"] == ex["input_ids"] for ex in dm.train_set)
        assert dm.sample_prompts == []
        return
    assert dm.stats["train_examples"] == N - 1 and dm.stats["val_examples"] == 1
    for ex in dm.train_set:
        text, answer = tok.decode(ex["input_ids"]), labelled(tok, ex)
        i = answer[1]
        assert answer == f"A{i}.<|im_end|>"  # exactly the answer and its end-of-turn token
        assert f"Q{i}?" in text
        assert ("Be terse." in text) == (fmt == "messages")
    (prompt, reference) = dm.sample_prompts[0]
    assert prompt[-1]["role"] == "user" and reference == f"A{prompt[-1]['content'][1]}."


def test_formats_map_fields_and_roles():
    sharegpt = make_converter("sharegpt")(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        }
    )
    assert [m["role"] for m in sharegpt] == ["system", "user", "assistant"]
    alpaca = make_converter("alpaca")({"instruction": "Sum", "input": "1 2", "output": "3"})
    assert alpaca == [
        {"role": "user", "content": "Sum\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]
    conversational = make_converter("prompt_completion")(
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}],
        }
    )
    assert [m["content"] for m in conversational] == ["Q", "A"]
    parts = make_converter("messages")(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "yo"},
            ]
        }
    )
    assert parts[0]["content"] == "hi"
    row = {"meta": {"sys": "S"}, "instances": [{"input": "Q", "output": "A"}]}
    assert get_field(row, "instances[0].output") == "A"
    assert get_field(row, "instances[3].output") is None
    cols = make_converter("columns", {**COLUMNS, "system": "meta.sys"})(row)
    assert [m["role"] for m in cols] == ["system", "user", "assistant"]


def test_auto_detection_and_its_errors():
    assert detect_format(["conversations"], {"conversations": [{"role": "user"}]}) == "messages"
    assert detect_format(["conversations"], {"conversations": [{"from": "human"}]}) == "sharegpt"
    assert detect_format(["instruction", "input", "output"], {}) == "alpaca"
    assert detect_format(["prompt", "completion"], {}) == "prompt_completion"
    assert detect_format(["text", "meta"], {}) == "text"
    with pytest.raises(DataError, match=r"\['answer', 'question'\].*data.columns"):
        detect_format(["question", "answer"], {})
    with pytest.raises(DataError, match="data.columns"):
        make_converter("columns", {"prompt": "q"})
    with pytest.raises(DataError, match="data.format='csv'"):
        make_converter("csv")


def test_skips_are_counted_by_reason(tok, tmp_path):
    rows = rows_for("sharegpt")
    rows.append({"conversations": [{"from": "human", "value": "unanswered"}]})
    rows.append({"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}]})
    path = write_rows(tmp_path / "sg.jsonl", rows)
    dm = module(tok, tmp_path, path, val_examples=None, val_fraction=0.01)
    dm.setup()  # 8 rows -> 1 held out; which one depends on the seed, so count over both splits
    assert dm.stats["examples_read"] == N + 2
    assert dm.stats["skipped_no_assistant_turn"] == 1
    assert dm.stats["skipped_unknown_role_tool"] == 1
    assert dm.stats["train_examples"] + dm.stats["val_examples"] == N


def test_last_assistant_turn_only(tok):
    chat = [
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "A low-rank update."},
        {"role": "user", "content": "Who wrote it?"},
        {"role": "assistant", "content": "Hu et al."},
    ]
    ex = encode_chat(tok, chat, 512, train_on_all_assistant_turns=False)
    assert labelled(tok, ex) == "Hu et al.<|im_end|>"


@pytest.mark.parametrize("template", ["chatml", "alpaca", "custom"])
def test_fallback_and_custom_templates_are_used_and_saved(tok, tmp_path, template):
    jinja = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    path = write_rows(tmp_path / "a.jsonl", rows_for("alpaca"))
    dm = module(tok, tmp_path, path, template=jinja if template == "custom" else template)
    dm.setup()
    assert dm.stats["template"] == template
    ex = dm.train_set[0]
    text, answer = tok.decode(ex["input_ids"]), labelled(tok, ex)
    i = answer.strip()[1]
    # "assistant: A0." tokenizes as "assistant", ":", " A", ...: the token straddling the turn's
    # start carries the answer's first letter, so it is labelled, space and all.
    assert answer == (" " if template == "custom" else "") + f"A{i}.<|im_end|>"
    marker = {"chatml": "<|im_start|>user\n", "alpaca": "### Instruction:\n", "custom": "user: "}
    assert marker[template] + f"Q{i}?" in text
    assert "SmolLM" not in text  # not the tokenizer's own template
    tok.save_pretrained(tmp_path / "adapter")  # what train.py does after setup
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template
    assert saved == tok.chat_template and (template != "alpaca" or saved == ALPACA_TEMPLATE)


def test_chunk_tokens_counts_windows_overlap_and_tail():
    ids = list(range(10))
    chunks, dropped = chunk_tokens(ids, block_size=4)
    assert [c["input_ids"] for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7]] and dropped == 2
    chunks, dropped = chunk_tokens(ids, block_size=4, stride=1)  # windows start every 3 tokens
    assert [c["input_ids"] for c in chunks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunks[1]["labels"] == [IGNORE_INDEX, 4, 5, 6] and dropped == 0
    chunks, dropped = chunk_tokens(ids, block_size=4, keep_tail=True)
    assert chunks[-1]["input_ids"] == [8, 9] and dropped == 0


def test_text_chunking_counts_every_token(tok, tmp_path):
    rows = rows_for("text")
    path = write_rows(tmp_path / "docs.jsonl", rows)
    lens = {len(tok(r["text"], add_special_tokens=False).input_ids) + 1 for r in rows}  # + eos
    (doc_len,) = lens  # all documents have the same length here
    dm = module(tok, tmp_path, path, block_size=7, val_examples=2)
    dm.setup()
    chunks = dm.stats["train_examples"] + dm.stats["val_examples"]
    # Per split, the documents + eos are cut into 7-token chunks and the tail of each is dropped.
    assert dm.stats["dropped_tail_tokens"] == (4 * doc_len) % 7 + (2 * doc_len) % 7 > 0
    assert chunks * 7 + dm.stats["dropped_tail_tokens"] == N * doc_len
    eos = tok.eos_token_id
    assert sum(ex["input_ids"].count(eos) for ex in dm.train_set) >= 3  # documents joined by eos
    kept = module(tok, tmp_path, path, block_size=7, val_examples=2, keep_document_boundaries=True)
    kept.setup()
    assert kept.stats["dropped_tail_tokens"] == 0
    assert kept.stats["train_examples"] == 4 * -(-doc_len // 7)  # ceil: short tails kept
    assert sum(len(ex["input_ids"]) for ex in [*kept.train_set, *kept.val_set]) == N * doc_len


def test_rerun_reads_the_tokenization_cache(tok, tmp_path):
    path = write_rows(tmp_path / "a.jsonl", rows_for("alpaca"))
    first = module(tok, tmp_path, path)
    first.setup()
    again = module(tok, tmp_path, path)
    again.setup()
    assert not first.stats["tokenized_from_cache"] and again.stats["tokenized_from_cache"]
    assert again.stats["fingerprint_train"] == first.stats["fingerprint_train"]
    assert list(again.train_set) == list(first.train_set)
    # Another encoding -> another key; 36 tokens cut each answer short (33-token prompts + 5).
    other = module(tok, tmp_path, path, max_length=36)
    other.setup()
    assert other.stats["fingerprint_train"] != first.stats["fingerprint_train"]
    assert other.stats["truncated"] > 0


def test_folders_globs_arrow_and_validation_split(tok, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = rows_for("prompt_completion")
    write_rows(folder / "a.jsonl", rows[:3])
    write_rows(folder / "b.jsonl", rows[3:])
    for path in (folder, f"{folder}/*.jsonl"):
        dm = module(tok, tmp_path, path)
        dm.setup()
        assert dm.stats["examples_read"] == N
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for path in (saved, next(saved.glob("*.arrow"))):
        dm = module(tok, tmp_path, path)
        dm.setup()
        assert dm.stats["examples_read"] == N and dm.stats["format"] == "prompt_completion"
    # An explicit validation file is used as it is, not split off the training rows.
    files = {"train": str(folder / "a.jsonl"), "validation": str(folder / "b.jsonl")}
    dm = module(tok, tmp_path, "json", data_files=files)
    dm.setup()
    assert (dm.stats["train_examples"], dm.stats["val_examples"]) == (3, 3)


def test_streaming_batches(tok, tmp_path):
    path = write_rows(tmp_path / "a.jsonl", rows_for("alpaca"))
    dm = module(tok, tmp_path, path, streaming=True, val_examples=2, batch_size=2)
    dm.setup()
    assert dm.stats["val_examples"] == 2 and dm.stats["streaming"]
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]
    assert int((batches[0]["labels"] != IGNORE_INDEX).sum()) > 0
    # A streamed validation split: its first val_examples rows; all training rows stay.
    write_rows(tmp_path / "v.jsonl", rows_for("alpaca")[:5])
    files = {"train": str(path), "validation": str(tmp_path / "v.jsonl")}
    dm = module(tok, tmp_path, "json", data_files=files, streaming=True, val_examples=3)
    dm.setup()
    assert dm.stats["val_examples"] == 3
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == N


def test_bad_inputs_name_the_key(tok, tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        module(tok, tmp_path, f"{tmp_path}/*.jsonl").setup()
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(DataError, match="'.xyz'"):
        module(tok, tmp_path, odd).setup()
    path = write_rows(tmp_path / "a.jsonl", rows_for("alpaca"))
    with pytest.raises(DataError, match="split 'dev' not found"):
        module(tok, tmp_path, path, val_split="dev").setup()
    with pytest.raises(DataError, match="data.template='llama'"):
        module(tok, tmp_path, path, template="llama").setup()
    with pytest.raises(DataError, match="data.stride"):
        module(tok, tmp_path, path, block_size=8, stride=8)


# -------------------------------------------------------------------------------------------------
# End to end on the built-in model: `lorafit train data=file data.path=...` on two formats here;
# the others were run by hand with the same command (see the closing note).

E2E_FORMATS = ["alpaca", "text"]


def train_on_file(tmp_path, path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m lorafit.train data=file data.path=PATH` for 3 steps; (process, run folder)."""
    run_dir = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={run_dir}",
        "data=file",  # the format is detected, for text too
        f"data.path={path}",
        "data.block_size=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_examples=16",
        "data.batch_size=4",  # 3 steps inside the first epoch
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "samples.num_prompts=0",
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit.train", *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    return proc, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("fmt", E2E_FORMATS)
def test_end_to_end_per_format(tmp_path, fmt):
    path = write_rows(tmp_path / FILES[fmt], rows_for(fmt) * 3)
    proc, run_dir = train_on_file(tmp_path, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"detected '{fmt}'" in proc.stderr + proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["format"] == fmt and metrics["train_steps"] == 3
    assert metrics["data"]["train_supervised_tokens"] > 0


@pytest.mark.slow
def test_streaming_trains_and_an_exhausted_stream_is_an_error(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", rows_for("alpaca") * 3)  # 18 rows
    proc, run_dir = train_on_file(tmp_path, path, "data.streaming=true", "data.val_examples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["data"]["streaming"]
    proc, run_dir = train_on_file(tmp_path / "..", path, "data.streaming=true")  # 200 held out
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no usable training row is left after the first 18 rows" in proc.stderr
