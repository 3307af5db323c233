"""Zero latency, measured: base vs unmerged LoRA vs merged model on the built-in SmolLM2-135M.

One process times a forward pass (batch x tokens) and greedy generation for the three models,
interleaved round by round (the order rotates) so drift and other load hit all three alike, and
reports medians and the ratios to the base. It also measures how far casting the merged weights to
bfloat16/float16 moves the logits on merge's fixed batch (what ``lorafit.merge.TOLERANCE`` bounds).

    python benchmarks/bench_merge.py [--adapter RUN_OR_ADAPTER_DIR] [--device cpu|cuda]
    python benchmarks/bench_merge.py --tiny   # smoke run: same code, tiny random Llama, 1-2 rounds

``--tiny`` swaps SmolLM2's weights for a tiny random Llama (SmolLM2's tokenizer and vocabulary,
saved to a temporary folder) and the sizes and rounds for minimal ones; everything after loading
runs unchanged. Its numbers mean nothing and, unless ``--out`` is given, it only prints them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafit.adapters import load_adapter
from lorafit.lora import inject_lora, lora_modules, unwrap_lora
from lorafit.merge import (
    DTYPES,
    TOLERANCE,
    batch_logits,
    compare_logits,
    find_adapter_dir,
    load_base,
    resolve_base,
    verify_batch,
)

PROMPT = "Tell me about the history of the Eiffel Tower."
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower. "
) * 8
BUILTIN = "smollm2_135m"
# Defaults of the size options for the real run and for the smoke run (`--tiny`).
SIZES = {
    "full": dict(batch=4, tokens=128, new_tokens=32, rounds=30, gen_rounds=7),
    "tiny": dict(batch=1, tokens=16, new_tokens=4, rounds=2, gen_rounds=1),
}
# The smoke run's model: a tiny Llama (hidden 64, 2 layers, grouped-query attention like SmolLM2).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def write_tiny_base(folder: Path) -> str:
    """Save a tiny random Llama with the built-in's tokenizer into ``folder``; return its path."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(BUILTIN))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build(base_dir: str, adapter: Path | None, device: str):
    """Return ``{"base", "unmerged", "merged"}`` models (float32, eval) and the tokenizer."""
    models = {}
    for kind in ("base", "unmerged", "merged"):
        model, tokenizer = load_base(base_dir, adapter)
        if kind != "base":
            if adapter is not None:
                load_adapter(model, adapter)
            else:  # a random r=8 attention adapter; lora_B random so the merge is not trivial
                torch.manual_seed(0)  # before inject_lora: lora_A's init draws from it too
                inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16)
                with torch.no_grad():
                    for _, m in lora_modules(model):
                        nn.init.normal_(m.lora_B, std=0.02)
        if kind == "merged":
            unwrap_lora(model)  # merge each LoRA layer and put its plain nn.Linear back
        models[kind] = model.to(device).eval()
    return models, tokenizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_rounds(models: dict, fn, rounds: int, device: str) -> dict[str, float]:
    """Median seconds of ``fn(model)`` per model, interleaved with a rotating order."""
    names = list(models)
    for name in names:  # warm-up
        fn(models[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % 3 :] + names[: i % 3]:
            sync(device)
            t0 = time.perf_counter()
            fn(models[name])
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def cast_error(model: nn.Module, tokenizer, device: str) -> dict[str, dict]:
    """Logit difference of the (merged) model cast to each half dtype vs itself in float32."""
    batch = {k: v.to(device) for k, v in verify_batch(tokenizer).items()}
    ref = batch_logits(model, batch)
    out = {}
    for name in ("bfloat16", "float16"):
        model.to(DTYPES[name])
        out[name] = compare_logits(ref, batch_logits(model, batch), batch["attention_mask"])
        model.to(torch.float32)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", help="run or adapter folder (default: random r=8 q,k,v,o)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama, 1-2 rounds")
    p.add_argument("--batch", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--gen-rounds", type=int)
    p.add_argument("--out", help="results file; '-' prints only (default: RESULTS.md; --tiny: '-')")
    a = p.parse_args(argv)
    if a.tiny and a.adapter:
        p.error("--tiny builds its own random base; it cannot take --adapter")
    for key, value in SIZES["tiny" if a.tiny else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.out is None:
        a.out = "-" if a.tiny else str(Path(__file__).with_name("RESULTS.md"))
    if not a.tiny:
        return run(a, None)
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        run(a, write_tiny_base(Path(tmp)))


def run(a: argparse.Namespace, tiny_base: str | None) -> None:
    """Build the three models, time them and write the results (``tiny_base``: smoke run)."""
    adapter = find_adapter_dir(a.adapter) if a.adapter else None
    if tiny_base is not None:
        base_dir = tiny_base
    else:
        base_dir = resolve_base(BUILTIN) if adapter is None else resolve_base(None, adapter)
    models, tok = build(base_dir, adapter, a.device)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, : a.tokens].repeat(a.batch, 1).to(a.device)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = getattr(prompt, "input_ids", prompt).to(a.device)
    gen_kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
    gen_kw["pad_token_id"] = tok.pad_token_id
    forward = time_rounds(models, lambda m: m(ids), a.rounds, a.device)
    generate = time_rounds(
        models, lambda m: m.generate(prompt, attention_mask=torch.ones_like(prompt), **gen_kw),
        a.gen_rounds, a.device,
    )  # fmt: skip
    batch = {k: v.to(a.device) for k, v in verify_batch(tok).items()}
    merge_check = compare_logits(
        batch_logits(models["unmerged"], batch),
        batch_logits(models["merged"], batch),
        batch["attention_mask"],
    )
    casts = cast_error(models["merged"], tok, a.device)
    write_results(a, adapter, forward, generate, merge_check, casts)


def write_results(a, adapter, forward, generate, merge_check, casts) -> None:
    env = (
        f"device `{a.device}`"
        + (f" ({torch.cuda.get_device_name()})" if a.device.startswith("cuda") else "")
        + f", torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, python {platform.python_version()}"
    )
    rows = [
        f"| forward, batch {a.batch} x {a.tokens} tokens ({a.rounds} rounds) |",
        f"| greedy generation, {a.new_tokens} new tokens ({a.gen_rounds} rounds) |",
    ]
    model = (
        "Tiny random Llama (smoke run, `--tiny`; SmolLM2's tokenizer, float32)"
        if a.tiny
        else "SmolLM2-135M-Instruct (built-in, float32)"
    )
    lines = [
        "# Benchmark: zero-latency merge (`make bench`, `benchmarks/bench_merge.py`)",
        "",
        f"{model}, adapter: {adapter or 'random r=8 on q,k,v,o (lora_alpha 16)'}; {env}.",
        "Medians of interleaved rounds in one process; ratio = model time / base time.",
        "",
        "| what | base ms | unmerged ms | merged ms | unmerged/base | merged/base |",
        "|---|---|---|---|---|---|",
    ]
    for row, t in zip(rows, (forward, generate), strict=True):
        ms = {k: 1000 * v for k, v in t.items()}
        lines.append(
            f"{row} {ms['base']:.1f} | {ms['unmerged']:.1f} | {ms['merged']:.1f} | "
            f"{t['unmerged'] / t['base']:.3f} | {t['merged'] / t['base']:.3f} |"
        )
    lines += [
        "",
        f"Merged vs unmerged logits (float32, merge's fixed batch, {merge_check['positions']} "
        f"tokens): max abs diff {merge_check['max_abs_diff']:.3g}, top-1 agreement "
        f"{100 * merge_check['top1_agreement']:.1f}%.",
        "",
        "Casting the merged float32 weights to a half type moves the logits by (this bounds the "
        "`--dtype` tolerances in `lorafit.merge.TOLERANCE`):",
        "",
        "| dtype | max abs diff | max rel diff | top-1 agreement | merge tolerance |",
        "|---|---|---|---|---|",
    ]
    for name, c in casts.items():
        lines.append(
            f"| {name} | {c['max_abs_diff']:.3g} | {c['max_rel_diff']:.3g} | "
            f"{100 * c['top1_agreement']:.1f}% | {TOLERANCE[name]:g} |"
        )
    text = "\n".join(lines) + "\n"
    if a.out != "-":
        out = Path(a.out)
        old = out.read_text() if out.is_file() else ""
        # other benchmarks' sections ("# Benchmark: ..." after this one's) are kept
        later = old.find("\n# Benchmark:", 1)
        rest = old[later:] if later >= 0 and not old[later:].startswith("\n" + lines[0]) else ""
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + rest)
        tmp.replace(out)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
