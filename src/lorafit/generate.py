"""Generation from the command line: a base model, an adapter (or run folder), or a merged folder.

Prompts are user turns rendered with the tokenizer's chat template (ChatML when it has none).
Answers stream to the terminal token by token; ``compare`` prints the base's and the tuned model's
answers side by side instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from transformers import TextStreamer

from lorafit.adapters import CONFIG_NAME, load_adapter, read_adapter_config
from lorafit.data.encoding import render
from lorafit.lora import disable_lora, lora_modules
from lorafit.merge import find_adapter_dir, load_base, resolve_base

DEFAULT_BASE = "smollm2_135m"
Messages = list[dict[str, str]]


def load_for_generation(source: str | None, base: str | None = None):
    """Load what ``source`` names, in float32, eval mode.

    Args:
        source: A run folder or adapter folder (loads its base plus the adapter), a model folder
            with ``config.json`` (a merged export or any base), or None for ``base``.
        base: Base folder or built-in name; default: the adapter's base, else the built-in.

    Returns:
        ``(model, tokenizer)``; the model has LoRA layers when an adapter was loaded, frozen
        (no parameter requires grad). An adapter on a tied output head is loaded on an untied
        copy of the head (the same outputs unmerged).

    Raises:
        FileNotFoundError: ``source`` is none of these folders.
        ValueError: the adapter is not a causal-LM one (a classifier).
    """
    adapter_dir = None
    if source is not None:
        path = Path(source)
        if (path / CONFIG_NAME).is_file() or (path / "adapter" / CONFIG_NAME).is_file():
            adapter_dir = find_adapter_dir(path)
        elif (path / "config.json").is_file():
            base = str(path)  # a plain model folder: a merged export or a base
        else:
            raise FileNotFoundError(
                f"{path} is not a run folder, an adapter folder ({CONFIG_NAME}) or a model folder "
                "(config.json). Give one of these, or no SOURCE for the built-in base model."
            )
    if adapter_dir is None:
        base_dir = resolve_base(base or DEFAULT_BASE)
        return load_base(base_dir, None)
    task_type = read_adapter_config(adapter_dir).get("task_type") or "CAUSAL_LM"
    if task_type != "CAUSAL_LM":
        raise ValueError(
            f"{adapter_dir} is a {task_type} adapter (e.g. a classifier); `lorafit generate` needs "
            "a causal-LM run. Score texts with `lorafit merge` and transformers' pipeline instead."
        )
    model, tokenizer = load_base(resolve_base(base, adapter_dir), adapter_dir)
    load_adapter(model, adapter_dir, untie_embeddings=True)  # frozen: for inference
    return model.eval(), tokenizer


def read_prompts(prompts: Sequence[str] = (), prompts_file: str | os.PathLike | None = None):
    """Prompts from the command line and/or a JSONL file, as message lists.

    Each JSONL line is ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}``; a
    trailing assistant turn (a reference answer) is dropped.

    Raises:
        ValueError: No prompt at all, or a line that is neither form (file and line named).
    """
    conversations: list[Messages] = [[{"role": "user", "content": p}] for p in prompts]
    if prompts_file is not None:
        path = Path(prompts_file)
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                msgs = row["messages"] if "messages" in row else [{"role": "user", **_p(row)}]
                if msgs and msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                assert msgs and all({"role", "content"} <= set(m) for m in msgs)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise ValueError(
                    f"{path}:{i}: expected a JSON object with 'prompt' (a string) or 'messages' "
                    '(a list of {"role", "content"}), got: ' + line[:80]
                ) from None
            conversations.append(msgs)
    if not conversations:
        raise ValueError("No prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.jsonl.")
    return conversations


def _p(row: dict) -> dict[str, str]:
    if not isinstance(row.get("prompt"), str):
        raise KeyError("prompt")
    return {"content": row["prompt"]}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    messages: Messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: TextIO | None = None,
) -> str:
    """One answer to ``messages``: greedy when ``temperature`` is 0, else sampled.

    Args:
        stream: Where to print tokens as they come (e.g. ``sys.stdout``); None: silent.

    Returns:
        The answer text, special tokens removed.
    """
    text = render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda t, stream_end=False: print(
            t, end="" if not stream_end else "\n", file=stream, flush=True
        )
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def side_by_side(left: str, right: str, titles=("base", "tuned"), width: int | None = None) -> str:
    """Two texts in two wrapped columns under ``titles``."""
    width = width or shutil.get_terminal_size((100, 20)).columns
    col = max(20, (width - 3) // 2)

    def lines(t: str) -> list[str]:
        return [w for p in t.splitlines() or [""] for w in textwrap.wrap(p, col) or [""]]

    a, b = lines(left), lines(right)
    rows = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    rows += [f"{x:<{col}} | {y}" for x, y in zip(a, b, strict=True)]
    return "\n".join(rows)


def run(
    source: str | None,
    prompts: list[Messages],
    *,
    base: str | None = None,
    compare: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    out: TextIO | None = None,
) -> list[dict]:
    """Answer every prompt, streaming to ``out`` (default stdout), or side by side (``compare``).

    Returns:
        One ``{"prompt", "answer"}`` (plus ``"base"`` with ``compare``) per prompt.

    Raises:
        ValueError: ``compare`` without an adapter to compare against.
    """
    out = out or sys.stdout
    model, tokenizer = load_for_generation(source, base)
    if compare and next(lora_modules(model), None) is None:
        raise ValueError(
            "--compare needs an adapter or run folder as SOURCE (the base is the model without "
            "it); a merged or base folder has nothing to compare against."
        )
    kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    rows = []
    for messages in prompts:
        print(f">>> {messages[-1]['content']}", file=out, flush=True)
        torch.manual_seed(seed)
        if not compare:
            answer = generate(model, tokenizer, messages, stream=out, **kw)
            rows.append({"prompt": messages, "answer": answer})
            continue
        with disable_lora(model):
            base_answer = generate(model, tokenizer, messages, **kw)
        torch.manual_seed(seed)
        answer = generate(model, tokenizer, messages, **kw)
        print(side_by_side(base_answer, answer) + "\n", file=out, flush=True)
        rows.append({"prompt": messages, "base": base_answer, "answer": answer})
    return rows
