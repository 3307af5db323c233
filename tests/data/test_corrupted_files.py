"""Property test: a valid JSONL or CSV file corrupted at random (bytes, fields, types, truncation)
gives a clean lorafit error naming the file, or a run whose every row is an example or a counted
skip; never an exception from inside a library, never a NaN loss on what survives."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafit.data.encoding import lm_collator
from lorafit.data.lm import ChatDataModule

ROWS = 8
RUNS = {"examples": 0, "errors": 0, "skips": 0}  # what the property saw (printed at the end)

# What a field can be turned into: the types a JSON value can have, and text edge cases.
ODD_VALUES = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.just(""),
    st.just("   "),
    st.just("NA"),
    st.text(max_size=20),
    st.just("x " * 200),  # longer than max_length: truncated
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just([{"type": "text", "text": "parts"}]),
)


@pytest.fixture(scope="module")
def tok(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
    )
    return LlamaForCausalLM(config).eval()


def valid_rows() -> list[dict]:
    return [
        {"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(ROWS)
    ]


@st.composite
def corrupted(draw) -> tuple[str, bytes]:
    """(file suffix, bytes): the valid rows as JSONL or CSV, then 1-3 corruptions."""
    suffix = draw(st.sampled_from([".jsonl", ".csv"]))
    rows = valid_rows()
    for _ in range(draw(st.integers(0, 3))):  # field and type corruptions
        i = draw(st.integers(0, ROWS - 1))
        what = draw(st.sampled_from(["value", "delete", "row_type", "rename"]))
        key = draw(st.sampled_from(["prompt", "completion"]))
        if what == "value":
            rows[i] = {**rows[i], key: draw(ODD_VALUES)} if isinstance(rows[i], dict) else rows[i]
        elif what == "delete" and isinstance(rows[i], dict):
            rows[i] = {k: v for k, v in rows[i].items() if k != key}
        elif what == "rename" and isinstance(rows[i], dict):
            rows[i] = {("question" if k == key else k): v for k, v in rows[i].items()}
        elif what == "row_type":
            rows[i] = draw(st.sampled_from([[1, 2], "a string", 3, None, {}]))
    if suffix == ".jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        lines = ["prompt,completion"]
        for r in rows:
            r = r if isinstance(r, dict) else {"prompt": str(r)}
            cells = [r.get("prompt"), r.get("completion")]
            lines.append(",".join("" if c is None else str(c) for c in cells))
        data = ("\n".join(lines) + "\n").encode()
    for _ in range(draw(st.integers(0, 2))):  # byte corruptions
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["insert", "flip", "truncate", "bom", "drop_line"]))
        if how == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
        elif how == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif how == "truncate":
            data = data[:at]
        elif how == "bom":
            data = b"\xef\xbb\xbf" + data
        elif how == "drop_line":
            lines = data.split(b"\n")
            del lines[at % len(lines)]
            data = b"\n".join(lines)
    return suffix, data


def is_lorafit_error(e: BaseException) -> bool:
    return isinstance(e, ValueError | OSError) and type(e).__module__.startswith("lorafit.")


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples in every run (CI)
    database=None,  # nothing to replay: the examples are fixed
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=corrupted())
def test_corrupted_files_give_a_named_error_or_counted_skips(tok, tiny, case):
    suffix, data = case
    RUNS["examples"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corrupted{suffix}"
        path.write_bytes(data)
        dm = ChatDataModule(
            tok,
            source="datasets",
            path=str(path),
            cache_dir=f"{tmp}/cache",
            val_examples=1,
            num_samples=0,
            max_length=48,
        )
        try:
            dm.setup("fit")
        except Exception as e:
            assert is_lorafit_error(e), f"{type(e).__module__}.{type(e).__name__}: {e}"
            assert "corrupted" in str(e), str(e)  # names the file
            RUNS["errors"] += 1
            return
        stats = dm.stats
        skipped = sum(v for k, v in stats.items() if k.startswith("skipped_"))
        if stats["format"] != "text":  # a chat row is one example or one counted skip
            assert (
                stats["train_examples"] + stats["val_examples"] + skipped == stats["examples_read"]
            )
        RUNS["skips"] += skipped > 0
        batch = lm_collator(dm.tokenizer)(
            list(dm.train_set.select(range(min(8, len(dm.train_set)))))
        )
        with torch.no_grad():
            loss = tiny(**batch).loss.item()
        assert math.isfinite(loss), (stats, loss)


def test_zz_the_property_ran_on_both_outcomes():
    """Runs after the property (file order): it saw both errors and counted skips."""
    print(f"hypothesis examples: {RUNS}")
    if RUNS["examples"]:
        assert RUNS["errors"] > 0 and RUNS["skips"] > 0, RUNS
