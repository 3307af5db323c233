"""Merged export: fold LoRA adapters into the base, write a plain transformers folder, verify.

``merge_to_folder`` loads the base in float32, loads the adapter (or a weighted combination of
several, :mod:`lorafit.multi`), keeps the logits of that unmerged model on a fixed batch of real
text, merges layer by layer in place (one copy of the model) and checks the merge there, in float32
with a tight tolerance: a half-precision cast must not hide a wrong merge. It then casts once to the
output dtype (the base's own by default), writes ``config.json``, ``model.safetensors``, the
tokenizer and ``generation_config.json`` to a temporary folder, reloads it with plain
``transformers``, checks the cast's error and the reload, and writes ``merge_report.json`` before
renaming the folder into place: a failed check or write leaves nothing. The base an adapter goes
on (shared with ``generate`` and ``analyze``): :mod:`.base`.
An adapter trained on a quantized base (``lorafit.json``'s ``base_quantization``) merges into that
base dequantized to float32. PiSSA/OLoRA adapters are saved converted to the original base.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from lorafit.adapters import load_adapter, read_adapter_config
from lorafit.lora import TiedEmbeddingsError, unwrap_lora
from lorafit.merge.base import MergeError, find_adapter_dir, head_kwargs, load_base, resolve_base
from lorafit.models import AUTO_CLASSES, save_model
from lorafit.runinfo import staged_dir

__all__ = [  # with the names of .base, re-exported here
    "MergeError",
    "find_adapter_dir",
    "head_kwargs",
    "load_base",
    "resolve_base",
    "merge_to_folder",
]

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max |logit difference| allowed. float32: the merged vs the unmerged model, both float32 (the merge
# check, at every output dtype). Half types: the cast merged model vs the float32 one; casting
# SmolLM2-135M's weights alone moves its logits on the fixed batch by about half these bounds
# (bfloat16 ~2.2, float16 ~0.4; benchmarks/RESULTS.md).
TOLERANCE = {"float32": 1e-4, "bfloat16": 4.0, "float16": 1.0}
# float32 rounding of the merged weights grows with the logits' size: over a 49k vocabulary a
# correct merge reaches ~3e-6 of the largest |logit|, so that scale is allowed too.
RTOL = 1e-5
# The fixed verification batch: chat turns (rendered with the model's chat template) and plain text.
VERIFY_PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "How do I sort a list in Python?",
]
VERIFY_TEXT = (
    "The Eiffel Tower was built for the 1889 World's Fair in Paris. At 330 metres it was the "
    "tallest man-made structure in the world for forty-one years."
)


def verify_batch(tokenizer) -> dict[str, Tensor]:
    """The fixed batch, padded right: one plain text and the prompts, chat-formatted when the
    tokenizer has a template; without one (an encoder such as BERT) all are plain texts with the
    tokenizer's special tokens ([CLS] ... [SEP]), so a classifier is checked on 4 inputs."""
    chat = bool(tokenizer.chat_template)
    texts = [VERIFY_TEXT] + [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if chat
        else p
        for p in VERIFY_PROMPTS
    ]
    tokenizer.padding_side = "right"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat))


@torch.no_grad()
def batch_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Float32 logits on ``batch``: ``(B, T, V)`` for a causal LM, ``(B, C)`` for a classifier."""
    return model(**batch).logits.float()


def compare_logits(ref: Tensor, got: Tensor, mask: Tensor) -> dict[str, float]:
    """Differences at the real (non-padding) tokens.

    Args:
        ref: Reference logits ``(B, T, V)`` (or ``(B, C)``).
        got: Logits to check, same shape.
        mask: Attention mask ``(B, T)``; ignored for ``(B, C)`` logits.

    Returns:
        ``max_abs_diff``, ``mean_abs_diff``, ``max_rel_diff`` (max abs diff / max |ref|),
        ``max_abs_logit`` (max |ref|),
        ``top1_agreement`` (fraction of positions with the same argmax) and ``positions``.
    """
    if ref.dim() == 3:
        ref, got = ref[mask.bool()], got[mask.bool()]  # (N, V) at real tokens
    diff = (ref - got).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_rel_diff": (diff.max() / ref.abs().max()).item(),
        "max_abs_logit": ref.abs().max().item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "positions": ref.shape[0],
    }


def base_dtype(base_dir: str) -> str:
    """The dtype the base's ``config.json`` records (``dtype``, or the older ``torch_dtype``), as
    a :data:`DTYPES` name; ``float32`` when it records none of them."""
    config = AutoConfig.from_pretrained(base_dir)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def cast_like_reload(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model`` as ``from_pretrained(dtype=...)`` builds it: parameters and saved buffers;
    unsaved buffers (rotary ``inv_freq``) keep their float32, so its logits equal the reload's."""
    saved = model.state_dict(keep_vars=True)
    unsaved = {n: b for n, b in model.named_buffers() if n not in saved}
    model.to(dtype)
    for name, buffer in unsaved.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, buffer)
    return model


def _load_adapters(model, adapter_dirs, weights, combination, untie) -> dict[str, Any]:
    """One adapter as is, or several combined with ``weights``. Returns what the report records."""
    if len(adapter_dirs) == 1 and weights is None:
        config = load_adapter(model, adapter_dirs[0], untie_embeddings=untie)
        return {"adapters": [str(adapter_dirs[0])], "r": config["r"]}
    from lorafit.multi import AdapterSet

    if weights is None or len(weights) != len(adapter_dirs):
        raise MergeError(
            f"{len(adapter_dirs)} adapters need --weights with {len(adapter_dirs)} numbers "
            f"(got {None if weights is None else len(weights)})."
        )
    bank = AdapterSet(model)
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    for name, d in zip(names, adapter_dirs, strict=True):
        bank.load(name, d, untie_embeddings=untie)
    used = bank.add_weighted("combined", names, list(weights), combination)
    bank.set_active("combined")
    return {
        "adapters": [str(d) for d in adapter_dirs],
        "weights": list(weights),
        "combination": used,
        "r": bank.configs["combined"]["r"],
    }


def merge_to_folder(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    dtype: str | None = None,
    *,
    base: str | None = None,
    weights: Sequence[float] | None = None,
    combination: str | None = None,
    verify: bool = True,
    atol: float | None = None,
    overwrite: bool = False,
    untie_embeddings: bool = False,
) -> dict[str, Any]:
    """Merge adapter(s) into the base and write a verified plain transformers folder at ``out``.

    Three checks on the fixed batch, each in the report: ``merge`` (the top-level numbers: the
    merged vs the unmerged model, both float32), ``cast`` (the model in ``dtype`` vs the float32
    merged one: rounding only, bounded by :data:`TOLERANCE`) and ``saved`` (the folder reloaded
    with plain transformers vs the model that was written).

    Args:
        sources: Run folders or adapter folders (several only with ``weights``).
        out: Folder to create; must not exist unless ``overwrite``.
        dtype: ``float32``, ``bfloat16`` or ``float16``: the saved weights' dtype; default: the
            base's (its ``config.json``), so a bfloat16 base stays bfloat16.
        base: Base model folder or built-in name; default: the adapter's
            ``base_model_name_or_path``.
        weights: One weight per source, for a weighted combination.
        combination: ``linear``/``cat``/None (auto); see
            :meth:`lorafit.multi.AdapterSet.add_weighted`.
        verify: Fail when a check fails (else write anyway, ``passed: false`` in the report).
        atol: Max abs logit difference of the merge check; default: ``TOLERANCE["float32"]`` or
            :data:`RTOL` x the largest |logit|, whichever is larger.
        overwrite: Replace an existing ``out``.
        untie_embeddings: Allow an adapter on an output head tied to the input embedding: the
            merged model gets its own head weight (``tie_word_embeddings: false``).

    Returns:
        The report written to ``out/merge_report.json``.

    Raises:
        MergeError: Bad arguments, output folder exists, a tied head without
            ``untie_embeddings``, or a failed check (nothing written).
        FileNotFoundError, ValueError: Unreadable adapter folders (from :mod:`lorafit.adapters`).
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r} is not one of {list(DTYPES)}.")
    if out.exists() and not overwrite:
        raise MergeError(f"Output folder {out} exists; choose another --out or pass --overwrite.")
    adapter_dirs = [find_adapter_dir(s) for s in sources]
    for source, adapter_dir in zip(sources, adapter_dirs, strict=True):
        kept = {Path(source).resolve(), adapter_dir.resolve()}
        if any(k == out.resolve() or k.is_relative_to(out.resolve()) for k in kept):
            raise MergeError(
                f"--out {out} holds the source {source}: writing the merged model there would "
                "delete it. Choose another --out."
            )
    first = read_adapter_config(adapter_dirs[0])
    base_dir = resolve_base(base, adapter_dirs[0])
    source = "--dtype" if dtype else "the base's config.json"
    dtype = dtype or base_dtype(base_dir)
    task, quant = first.get("task_type"), (first.get("lorafit") or {}).get("base_quantization")
    model, tokenizer = load_base(
        base_dir, adapter_dirs[0], task, quant, **head_kwargs(adapter_dirs[0], first)
    )
    report: dict[str, Any] = {
        "base": base_dir,
        "dtype": dtype,
        "dtype_source": source,
        "task_type": task or "CAUSAL_LM",
        "base_quantization": quant,  # None: a float base
    }
    try:
        report.update(_load_adapters(model, adapter_dirs, weights, combination, untie_embeddings))
    except TiedEmbeddingsError:
        raise MergeError(
            f"{adapter_dirs[0]} adapts the output head of {base_dir}, which ties that head's "
            "weight to the input embedding (tie_word_embeddings): merging there would change the "
            "input embedding too. Pass --untie-embeddings to give the merged model its own head "
            "weight (a bigger folder, tie_word_embeddings: false), or use the adapter unmerged."
        ) from None
    model.eval()  # the new LoRA layers start in training mode: their dropout must be off
    batch = verify_batch(tokenizer)
    mask = batch["attention_mask"]
    reference = batch_logits(model, batch)  # the unmerged model in float32
    unwrap_lora(model)  # merge, in float32
    merged = batch_logits(model, batch)
    report.update(compare_logits(reference, merged, mask))
    report["batch_shape"] = list(batch["input_ids"].shape)
    floor = max(TOLERANCE["float32"], RTOL * report["max_abs_logit"])
    report["tolerance_abs"] = floor if atol is None else atol
    failed = [] if report["max_abs_diff"] <= report["tolerance_abs"] else ["merge"]
    if verify and failed:
        raise MergeError(_failure(report, failed, out))
    cast = (
        merged
        if dtype == "float32"
        else batch_logits(cast_like_reload(model, DTYPES[dtype]), batch)
    )
    report["cast"] = {**compare_logits(merged, cast, mask), "tolerance_abs": TOLERANCE[dtype]}
    with staged_dir(out) as tmp:  # nothing reaches `out` unless the checks pass
        save_model(model, tokenizer, tmp)
        del model  # the merged copy goes before the reload: one model in memory at a time
        reloaded = type_of(first).from_pretrained(tmp, dtype=DTYPES[dtype]).eval()
        report["saved"] = {
            **compare_logits(cast, batch_logits(reloaded, batch), mask),
            "tolerance_abs": floor,
        }
        for check in ("cast", "saved"):
            numbers = report[check]
            if not numbers["max_abs_diff"] <= numbers["tolerance_abs"]:  # NaN fails too
                failed.append(check)
        report["passed"] = not failed
        report["verified"] = verify
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if verify and failed:
            raise MergeError(_failure(report, failed, out))
    return report


def _failure(report: dict[str, Any], failed: list[str], out: Path) -> str:
    """The message of a failed check: which one, by how much, and what to do."""
    dtype = report["dtype"]
    if failed[0] == "merge":
        return (
            f"The merge is wrong: the merged model differs from the unmerged one by "
            f"{report['max_abs_diff']:.3g} (max abs logit difference, both float32; tolerance "
            f"{report['tolerance_abs']:g}), top-1 agreement {100 * report['top1_agreement']:.1f}%. "
            f"Nothing was written to {out}. Raise --atol or pass --no-verify to keep it anyway."
        )
    check = report[failed[0]]
    what = {
        "cast": f"Casting the merged model to {dtype} moves its logits",
        "saved": f"The written folder, reloaded with transformers ({dtype}), differs from the "
        "merged model",
    }[failed[0]]
    return (
        f"{what} by {check['max_abs_diff']:.3g} (max abs logit difference; bound "
        f"{check['tolerance_abs']:g}); the float32 merge itself passed. Nothing was written to "
        f"{out}. "
        + ("Use --dtype float32, or pass" if dtype != "float32" else "Pass")
        + " --no-verify to keep it anyway."
    )


def type_of(config: dict[str, Any]):
    """The Auto class for an adapter's ``task_type``."""
    return AUTO_CLASSES.get(config.get("task_type") or "CAUSAL_LM", AutoModelForCausalLM)
