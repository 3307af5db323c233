"""What a run writes into its folder: the adapter (or full model), samples.jsonl, loss_curve.png
and metrics.json. Every file goes through `lorafit.runinfo`'s atomic writers.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit import runinfo
from lorafit.adapters import WEIGHTS_NAME, save_adapter
from lorafit.generate import generate
from lorafit.lora import LoRAConfig, LoRAReport, disable_lora, lora_modules
from lorafit.models import save_model
from lorafit.runinfo import atomic_write, readable_ticks, staged_dir, write_figure

log = logging.getLogger(__name__)


def save_full_model(model: nn.Module, tokenizer, out: Path) -> int:
    """Write a fully fine-tuned model as a plain transformers folder, atomically.

    Returns:
        Bytes of its safetensors weight files.
    """
    with staged_dir(out) as tmp:
        save_model(model, tokenizer, tmp)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def save_lora(
    model: nn.Module,
    tokenizer,
    lora: LoRAConfig,
    out: Path,
    base_model_name_or_path: str,
    task_type: str = "CAUSAL_LM",
    heads: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Save the run's LoRA adapter (PEFT layout) with its tokenizer. Returns the adapter's bytes.

    Args:
        lora: the config that injected the layers (written as PEFT's `LoraConfig` fields).
        heads: last names of modules trained whole (a new classifier), saved as PEFT's
            `modules_to_save`.
        extra: lorafit's own metadata, written to `lorafit.json` beside PEFT's files.
    """
    adapter_dir = save_adapter(
        model,
        out,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        exclude_modules=lora.exclude_modules,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        modules_to_save=heads or None,
        extra=extra,
        tokenizer=tokenizer,  # the template used for training travels with it, in one write
    )
    return (adapter_dir / WEIGHTS_NAME).stat().st_size


@torch.no_grad()
def write_samples(model: nn.Module, tokenizer, prompts, max_new_tokens: int, path: Path) -> None:
    """Greedy answers of the base (LoRA disabled) and the tuned model to held-out prompts, one
    JSON line each: `prompt` (messages), `reference`, `base` (None for full fine-tuning), `tuned`.
    """
    model.eval()
    has_lora = any(True for _ in lora_modules(model))
    rows = []
    for messages, reference in prompts:
        with disable_lora(model):
            # Full fine-tuning (no LoRA layers) leaves no base model to ask.
            base = generate(model, tokenizer, messages, max_new_tokens) if has_lora else None
        tuned = generate(model, tokenizer, messages, max_new_tokens)
        rows.append({"prompt": messages, "reference": reference, "base": base, "tuned": tuned})
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_logged(csv_path: Path, key: str) -> list[tuple[int, float]]:
    """`(step, value)` pairs of one column of a Lightning CSVLogger `metrics.csv` (empty cells and
    a missing file give nothing), sorted by step. The parts a resumed run set aside before
    Lightning restarted the file (`metrics.part<N>.csv`, see `lorafit.reproduce.resume_argv`) come
    first; a step logged again after the resume takes the later value."""
    parts = sorted(
        csv_path.parent.glob(f"{csv_path.stem}.part*.csv"),
        key=lambda p: int(p.stem.rsplit("part", 1)[1]),
    )
    values: dict[int, float] = {}
    for part in [*parts, csv_path]:
        if not part.is_file():
            continue
        with part.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(key) not in (None, ""):
                    values[int(row["step"])] = float(row[key])
    return sorted(values.items())


def plot_loss_curve(csv_path: Path, path: Path, title: str, ylabel: str):
    """Draw `train/loss` and `val/loss` from the CSV logger's file (and the parts before a
    resume, `read_logged`) as PNG.

    Returns:
        The matplotlib figure (saved and closed), or None, drawing nothing, when the file has no
        loss logged.
    """
    train, val = read_logged(csv_path, "train/loss"), read_logged(csv_path, "val/loss")
    if not train and not val:
        log.info("No loss logged to %s (no CSV logger?): loss_curve.png not drawn.", csv_path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, label="train/loss (logged batches)", lw=0.8, alpha=0.35)
        # Length-grouped batches differ a lot in loss (short answers are harder per token), so the
        # trend is the mean over the last `k` logged batches.
        k = max(1, min(25, len(losses) // 5))
        trend = [sum(losses[max(0, i - k + 1) : i + 1]) / min(k, i + 1) for i in range(len(losses))]
        ax.plot(steps, trend, label=f"train/loss (mean of {k})", lw=1.5, color="C0")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val/loss")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    readable_ticks(fig)  # a nearly flat loss would otherwise read as 0, 2, 4 plus an offset
    fig.tight_layout()
    write_figure(fig, path)
    return fig


def run_metrics(
    cfg,
    task,
    lora: LoRAConfig,
    report: LoRAReport,
    datamodule,
    module,
    trainer,
    before: dict[str, float],
    after: dict[str, float],
    task_metrics: dict[str, Any],
    *,
    adapter_bytes: int,
    train_seconds: float,
    threads: int,
) -> dict[str, Any]:
    """metrics.json's content (DESIGN.md lists the promised keys) for a finished run.

    Args:
        cfg: the composed run config (an OmegaConf node); recorded resolved under `config`.
        task: the task's LightningModule class; `module` and `trainer` the fitted ones.
        before, after: validation metrics before and after training (`eval_loss`, ...), and
            `general_loss` (the loss on text outside the task) when it was measured.
        task_metrics: the task's own entries (`module.after_fit`).
        adapter_bytes: size of the adapter (or full model) weights; `train_seconds` wall time of
            `trainer.fit`; `threads` torch's intra-op threads.
    """
    from omegaconf import OmegaConf

    eval_before, eval_after = before["eval_loss"], after["eval_loss"]
    return {
        "task": task.name,
        "model": cfg.model.name,
        "dataset": datamodule.stats.get("dataset", cfg.data.get("source", "?")),
        "lora_r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "target_modules": lora.target_modules,
        "lora_modules": len(report.modules),
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "trainable_fraction": report.trainable_fraction,
        "adapter_bytes": adapter_bytes,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_loss_reduction": 1 - eval_after / eval_before,
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        # forgetting: loss on text outside the task (`eval`, lorafit.tasks.general); causal_lm only
        **(
            {"general_loss_increase": after["general_loss"] - before["general_loss"]}
            if "general_loss" in before and "general_loss" in after
            else {}
        ),
        **task_metrics,
        "train_steps": trainer.global_step,
        # one optimizer step: micro_batch_size x accumulate_grad_batches x world_size examples
        "global_batch_size": datamodule.batch_size * datamodule.accumulate * trainer.world_size,
        "micro_batch_size": datamodule.batch_size,
        "accumulate_grad_batches": datamodule.accumulate,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "train_tokens": module.train_tokens,
        "skipped_nonfinite_steps": module.skipped_nonfinite,  # trainer.skip_nonfinite_batches
        "train_tokens_per_s": module.train_tokens / max(module.train_time, 1e-9),
        "train_seconds": train_seconds,
        "peak_rss_mb": runinfo.peak_rss_mb(),
        "peak_rss_scope": runinfo.peak_rss_scope(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        "seed": cfg.seed,
        "git_commit": runinfo.git_commit(),
        "versions": runinfo.versions(),
        "torch_threads": threads,
        "device": str(module.device),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "data": datamodule.stats,
        # the datasets library's own fingerprint of the tokenized training split (None: a stream)
        "data_fingerprint": getattr(datamodule.train_set, "_fingerprint", None),
        "status": "ok",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, written last: a run folder without it is not a finished run."""
    atomic_write(path, json.dumps(metrics, indent=2, default=str) + "\n")
