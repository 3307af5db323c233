"""`lorafit generate`: prompts, streaming, --compare, and adapter == merged answers (tiny Llama)."""

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorafit.adapters import save_adapter
from lorafit.cli import main
from lorafit.generate import read_prompts, run, side_by_side
from lorafit.lora import inject_lora, lora_modules
from lorafit.merge import merge_to_folder


@pytest.fixture
def adapter_dir(make_llama, smol_tokenizer, tmp_path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, plus a strong random adapter on it."""
    base = tmp_path / "base"
    make_llama(vocab_size=49152).save_pretrained(base)
    smol_tokenizer.save_pretrained(base)
    model = make_llama(vocab_size=49152)
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.5)
    return save_adapter(
        model,
        tmp_path / "run" / "adapter",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=False,
        base_model_name_or_path=base,
    )


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Hi"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts(["Hello"], path) == [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Q"}],  # the reference answer is dropped
    ]
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a JSON object with 'prompt'"):
        read_prompts([], path)
    with pytest.raises(ValueError, match="No prompt"):
        read_prompts([])


def test_side_by_side_wraps_two_columns():
    text = side_by_side("short", "a much longer answer " * 3, width=43)
    lines = text.splitlines()
    assert lines[0].split("|")[0].strip() == "base" and lines[0].endswith("tuned")
    assert len(lines) == 2 + 3 and all(line.index("|") == 21 for line in lines[2:])
    assert lines[2].startswith("short ") and lines[3].startswith(" " * 20 + " | ")


def test_stream_compare_and_merged_agree(adapter_dir, tmp_path):
    prompts = read_prompts(["What is your name?"])
    kw = {"max_new_tokens": 6}
    out = io.StringIO()
    [row] = run(str(adapter_dir.parent), prompts, out=out, **kw)  # run folder
    assert row["answer"] and row["answer"] in out.getvalue()  # streamed as it was generated
    [cmp] = run(str(adapter_dir), prompts, compare=True, out=io.StringIO(), **kw)
    [base] = run(None, prompts, base=str(tmp_path / "base"), out=io.StringIO(), **kw)
    assert cmp["answer"] == row["answer"] and cmp["base"] == base["answer"] != row["answer"]
    merge_to_folder([adapter_dir], tmp_path / "merged")
    [merged] = run(str(tmp_path / "merged"), prompts, out=io.StringIO(), **kw)
    assert merged["answer"] == row["answer"]  # greedy: the merged model answers the same
    with pytest.raises(ValueError, match="--compare needs an adapter"):
        run(str(tmp_path / "merged"), prompts, compare=True, out=io.StringIO(), **kw)


def test_cli_generate(adapter_dir, tmp_path, capsys):
    args = ["generate", str(adapter_dir), "--prompt", "Hi", "--max-new-tokens", "3"]
    assert main([*args, "--temperature", "0.8", "--top-p", "0.9"]) == 0
    assert ">>> Hi" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 1
    assert "is not a run folder, an adapter folder" in capsys.readouterr().err


def test_an_adapter_loaded_for_generation_is_frozen(adapter_dir):
    from lorafit.generate import load_for_generation

    model, _ = load_for_generation(str(adapter_dir))
    assert list(lora_modules(model)) and not model.training
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
