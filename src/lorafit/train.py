"""`lorafit train`: one Hydra config -> base model + LoRA + data -> Lightning fit -> run folder.

    python -m lorafit.train lora.r=16 trainer.max_steps=100
    lorafit train -m lora.r=4,8,16            # a multirun

The run folder (Hydra's output dir) receives `.hydra/`, `metrics.json`, `adapter/`,
`loss_curve.png`, `samples.jsonl`, Lightning's `csv/metrics.csv` and `checkpoints/`.
`metrics.json` is written last, so a folder without it is not a finished run; a run that failed
writes `failed.json` with the error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lorafit.adapters import save_adapter
from lorafit.generate import generate
from lorafit.lora import disable_lora, inject_lora, lora_modules, lora_report
from lorafit.merge import _move_into_place as move_into_place
from lorafit.merge import _write_model as write_model
from lorafit.models import load_model, load_tokenizer, resolve_model_dir
from lorafit.tasks import get_task

log = logging.getLogger("lorafit")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

if not OmegaConf.has_resolver("lorafit.wandb_offline"):
    OmegaConf.register_new_resolver(
        "lorafit.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY")
    )
if not OmegaConf.has_resolver("lorafit.mul"):  # sweeps: lora_alpha = ${lorafit.mul:2,${lora.r}}
    OmegaConf.register_new_resolver("lorafit.mul", lambda a, b: None if b is None else a * b)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def git_commit() -> str | None:
    """HEAD of the lorafit checkout, with `-dirty` when it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    import lightning
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "lorafit": __import__("lorafit").__version__,
    }


def data_fingerprint(examples) -> str:
    """sha256 of the tokenized training split: every example's token ids and labels, in order."""
    h = hashlib.sha256()
    for ex in examples:
        labels = ex.get("labels", ex.get("label"))  # (T,) ids for causal LM, an index for classes
        h.update(json.dumps([list(map(int, ex["input_ids"])), labels], default=int).encode())
    return h.hexdigest()


def set_threads(cfg: DictConfig) -> int:
    """Torch intra-op threads: `threads`, or an equal share of the cores per parallel joblib job."""
    n = cfg.get("threads")
    jobs = HydraConfig.get().launcher.get("n_jobs")  # only the joblib launcher has n_jobs
    if n is None and jobs:
        cores = os.cpu_count() or 1
        jobs = cores + 1 + jobs if jobs < 0 else jobs  # joblib: -1 = all cores, -2 = all but one
        n = max(1, cores // max(1, min(jobs, cores)))
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def reset_peak_rss() -> None:
    """Restart the peak-RSS count (Linux >= 4.0), so runs sharing a sweep process are not mixed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere peak_rss_mb falls back to the process-lifetime peak


def peak_rss_mb() -> float:
    """Peak resident memory since `reset_peak_rss` (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_logger(cfg: DictConfig):
    """The configured logger; a W&B one gets the sweep as group and the overrides as run name."""
    if not str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
        return instantiate(cfg.logger)
    hc = HydraConfig.get()
    kwargs = {"name": cfg.logger.name or hc.job.override_dirname or "defaults"}
    if cfg.logger.group is None and hc.mode == RunMode.MULTIRUN:
        kwargs["group"] = "/".join(Path(hc.sweep.dir).parts[-2:])  # e.g. 2026-11-29/18-55-00
    return instantiate(cfg.logger, **kwargs)


def finish_wandb(failed: bool) -> None:
    """Close the W&B run, so the next run of a sweep in this process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=int(failed))


def save_full_model(model, tokenizer, out: Path) -> int:
    """Write a fully fine-tuned model as a transformers folder (temp folder, then rename).

    Returns:
        Bytes of its safetensors weight files.
    """
    move_into_place(write_model(model, tokenizer, out), out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def save_lora(
    cfg: DictConfig,
    model,
    tokenizer,
    model_dir: str,
    out: Path,
    task_type: str = "CAUSAL_LM",
    heads: list[str] | None = None,
) -> int:
    """Save the run's LoRA adapter (PEFT layout) and tokenizer. Returns the adapter's bytes.

    `heads` are modules trained whole (a new classifier), saved as PEFT's `modules_to_save`.
    """
    extra = {"config_hash": config_hash(cfg), "model": cfg.model.name, "versions": versions()}
    if task_type == "SEQ_CLS":  # `lorafit merge` sizes the head from these names
        extra["id2label"] = {str(i): str(n) for i, n in model.config.id2label.items()}
    adapter_dir = save_adapter(
        model,
        out,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=OmegaConf.to_container(cfg.lora.target_modules)
        if OmegaConf.is_list(cfg.lora.target_modules)
        else cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
        exclude_modules=OmegaConf.to_container(cfg.lora.exclude_modules)
        if OmegaConf.is_list(cfg.lora.exclude_modules)
        else cfg.lora.exclude_modules,
        base_model_name_or_path=model_dir,
        task_type=task_type,
        modules_to_save=heads or None,
        extra=extra,
    )
    tokenizer.save_pretrained(adapter_dir)  # the template used for training travels with it
    return (adapter_dir / "adapter_model.safetensors").stat().st_size


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved run config (hydra section excluded), first 16 hex digits."""
    text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def generate_samples(model, tokenizer, prompts, max_new_tokens: int) -> list[dict]:
    """Greedy answers of the base (LoRA disabled) and the tuned model to held-out prompts."""
    model.eval()
    has_lora = any(True for _ in lora_modules(model))
    rows = []
    for messages, reference in prompts:
        with disable_lora(model):
            # Full fine-tuning (no LoRA layers) leaves no base model to ask.
            base = generate(model, tokenizer, messages, max_new_tokens) if has_lora else None
        tuned = generate(model, tokenizer, messages, max_new_tokens)
        rows.append({"prompt": messages, "reference": reference, "base": base, "tuned": tuned})
    return rows


def plot_loss_curve(
    history: dict[str, list[tuple[int, float]]],
    path: Path,
    title: str,
    ylabel: str = "loss per supervised token (nats)",
) -> None:
    """Training loss per step and validation loss points, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, losses, label="train/loss (per batch)", lw=0.8, alpha=0.35)
        # Length-grouped batches differ a lot in loss (short answers are harder per token), so the
        # trend is the mean over the last `k` batches.
        k = max(1, min(25, len(losses) // 5))
        trend = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, trend, label=f"train/loss (mean of {k})", lw=1.5, color="C0")
    if history["val"]:
        ax.plot(*zip(*history["val"], strict=True), "o-", label="val/loss")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def build(cfg: DictConfig):
    """Config -> (model, tokenizer, model_dir, lora report, datamodule). Raises on bad input.

    The data is read before the model so that the task can size the model from it (a classifier
    head gets one output per label). `lora.target_modules: null` (`lora=none`) trains every
    parameter instead of injecting LoRA; a task's new head is trained fully either way.
    """
    task = get_task(cfg.task)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    datamodule.setup("fit")
    for split in ("train_set", "val_set"):
        rows = getattr(datamodule, split)
        if hasattr(rows, "__len__") and len(rows) == 0:  # a stream: data.py checks its first row
            raise ValueError(
                f"The {split.removesuffix('_set')} split is empty after reading and filtering the "
                "data (see the log's skip counts); give more data, or change data.val_fraction / "
                "data.val_examples so that both splits keep rows."
            )
    model = load_model(model_dir, cfg.model, cfg.task, **task.model_kwargs(datamodule))
    if cfg.lora.get("target_modules") is None:  # full fine-tuning
        model.requires_grad_(True)
    else:
        inject_lora(model, **OmegaConf.to_container(cfg.lora, resolve=True))
    for name in task.head_names(model):
        model.get_submodule(name).requires_grad_(True)
    # from_pretrained returns eval mode and Lightning keeps each module's mode, so switch to train
    # mode here: dropout (LoRA's and the base's, as in PEFT/Trainer fine-tuning) is on in training.
    model.train()
    report = lora_report(model)
    log.info("LoRA: %s", report)
    return model, tokenizer, model_dir, report, datamodule


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tuning described by `cfg` and write the run folder. Returns the metrics."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    reset_peak_rss()
    threads = set_threads(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer, model_dir, report, datamodule = build(cfg)
    task = get_task(cfg.task)

    module = task.module(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=make_logger(cfg))
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
        torch.use_deterministic_algorithms(True)  # bit-identical reruns; see README on GPUs
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    def evaluate() -> dict[str, float]:
        """Validation metrics as `{"eval_loss": ..., "eval_accuracy": ..., ...}`."""
        out = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        return {k.replace("val/", "eval_", 1): float(v) for k, v in out.items()}

    before = evaluate()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_seconds = time.perf_counter() - t0
    after = evaluate()
    eval_before, eval_after = before["eval_loss"], after["eval_loss"]
    if not trainer.is_global_zero:  # DDP: one process writes the run folder
        return {"eval_loss_after": eval_after}
    task_metrics = task.after_fit(trainer, module, datamodule, run_dir) if task.after_fit else {}

    if cfg.lora.target_modules is None:
        adapter_bytes = save_full_model(model, tokenizer, run_dir / "model")
    else:
        heads = [n.rsplit(".", 1)[-1] for n in task.head_names(model)]
        adapter_bytes = save_lora(
            cfg, model, tokenizer, model_dir, run_dir / "adapter", task.peft_task_type, heads
        )

    if cfg.samples.num_prompts > 0 and hasattr(datamodule, "sample_prompts"):
        rows = generate_samples(
            model, tokenizer, datamodule.sample_prompts, cfg.samples.max_new_tokens
        )
        tmp = run_dir / ".samples.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, run_dir / "samples.jsonl")

    plot_loss_curve(
        module.history,
        run_dir / "loss_curve.png",
        f"{cfg.model.name} r={cfg.lora.r} alpha={cfg.lora.lora_alpha}",
        task.loss_label,
    )
    metrics = {
        "task": cfg.task,
        "model": cfg.model.name,
        "dataset": datamodule.stats.get("dataset", cfg.data.get("source", "?")),
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.lora_alpha,
        "target_modules": OmegaConf.to_container(cfg.lora.target_modules)
        if OmegaConf.is_list(cfg.lora.target_modules)
        else cfg.lora.target_modules,
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
        **task_metrics,
        "train_steps": trainer.global_step,
        "train_tokens": module.train_tokens,
        "train_tokens_per_s": module.train_tokens / max(module.train_time, 1e-9),
        "train_seconds": train_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "versions": versions(),
        "torch_threads": threads,
        "device": str(module.device),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "data": datamodule.stats,
        "data_fingerprint": data_fingerprint(datamodule.train_set),
        "status": "ok",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if isinstance(trainer.logger, WandbLogger):  # the final numbers as the W&B run summary
        trainer.logger.experiment.summary.update(
            {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        )
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "eval_loss %.4f -> %.4f (%.0f%% lower); adapter %s bytes; run folder %s",
        eval_before,
        eval_after,
        100 * metrics["eval_loss_reduction"],
        adapter_bytes,
        run_dir,
    )
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point. Returns `eval_loss_after` (the objective sweepers minimise)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        value = train(cfg)["eval_loss_after"]
        finish_wandb(failed=False)
        return value
    except Exception as e:
        finish_wandb(failed=True)
        run_dir = Path(hc.runtime.output_dir)
        write_json(
            run_dir / "failed.json",
            {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "overrides": list(hc.overrides.task),
                "traceback": traceback.format_exc(),
                "seed": cfg.seed,
            },
        )
        if multirun:  # one broken run must not end the sweep
            log.error("Run failed (recorded in %s/failed.json): %s", run_dir, e)
            return math.nan
        if isinstance(e, ValueError | OSError):  # bad input: one clear paragraph, no traceback
            print(f"\nlorafit: error: {e}\n", file=sys.stderr)
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
