"""`lorafit train --dry-run [overrides]` (or `dry_run=true`): everything a run checks before it
trains, in seconds, and no run folder.

compose (Hydra's compose API: no output folder, no log file) -> `lorafit.train.validate` -> read
the data (the data module's setup and one training step) -> the base model built from its
config on the meta device (no weights read) -> LoRA injected (the targets matched) -> a summary:
matched modules, trainable parameters, examples, steps per epoch and in all, the step's shape.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig

from lorafit.config import group_object
from lorafit.distributed import step_shape
from lorafit.estimate import estimate_config, trainable_like_a_run
from lorafit.lora import LoRAConfig, LoRAReport, lora_report
from lorafit.models import AUTO_CLASSES, ModelConfig, load_tokenizer, resolve_model_dir
from lorafit.schema import compose_train
from lorafit.train import validate

log = logging.getLogger("lorafit")

FLAGS = ("--dry-run", "dry_run=true", "+dry_run=true")  # as `lorafit.cli` spots them


def is_dry_run(argv: list[str]) -> bool:
    """Whether `lorafit train ARGV` asks for a dry run."""
    return any(a in FLAGS for a in argv)


def world_size(trainer: DictConfig) -> int:
    """Processes a fit with this `trainer` node would start (devices x nodes), without a Trainer:
    `devices: auto` (or -1) is every visible GPU when the accelerator may be a GPU, else 1."""
    devices, accelerator = trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto"))
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        count = len(devices)
    elif str(devices) in ("auto", "-1"):
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else 1
    else:
        count = int(devices)
    return count * int(trainer.get("num_nodes") or 1)


def memory_figure(
    cfg: DictConfig, report: LoRAReport, batch: dict[str, torch.Tensor]
) -> str | None:
    """`lorafit estimate`'s peak-memory figure of this run (weights, LoRA and optimizer state,
    activations of the micro-batch `batch`), one line for the dry run's summary."""

    shape = tuple(batch["input_ids"].shape)
    e = estimate_config(cfg, batch_shape=shape)
    return (
        f"~{e['peak_mb']:,.0f} MiB peak RSS for a {shape[0]} x {shape[1]} micro-batch "
        f"(activations {e['memory_parts_mb']['activations saved for backward']:,.0f} MiB; "
        f"`lorafit estimate` for the parts)"
    )


def total_steps(trainer: DictConfig, steps_per_epoch: int | None) -> int | None:
    """Optimizer steps the fit would run: `trainer.max_steps`, or `max_epochs` epochs (Lightning
    stops at whichever comes first; it defaults to 1000 epochs when neither is set)."""
    max_steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if epochs in (None, -1):
        epochs = None if max_steps != -1 else 1000
    by_epochs = epochs * steps_per_epoch if epochs is not None and steps_per_epoch else None
    candidates = [n for n in (by_epochs, max_steps if max_steps != -1 else None) if n is not None]
    return min(candidates) if candidates else None


def compose_dry(overrides: list[str]) -> DictConfig:
    """The composed `train` config with Hydra's runtime set as a run would have it, its output
    folder named (`hydra.run.dir`) but not made.

    Raises:
        ValueError: an override of a key the config lacks (see `lorafit.schema.compose_train`).
    """
    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).absolute())
        cfg.hydra.job.override_dirname = ",".join(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def meta_model(model_dir: str, model_cfg: ModelConfig, task: Any, datamodule: Any):
    """The task's model class for `model_dir`, built from its config.json on the meta device:
    the architecture and parameter shapes, no weights read, no memory used."""
    config = AutoConfig.from_pretrained(
        model_dir,
        revision=model_cfg.revision,
        trust_remote_code=bool(model_cfg.trust_remote_code),
        **task.model_kwargs(datamodule),  # e.g. num_labels for a classifier's head
    )
    with torch.device("meta"):
        return AUTO_CLASSES[task.name].from_config(
            config, trust_remote_code=bool(model_cfg.trust_remote_code)
        )


def modules_summary(report: LoRAReport) -> list[str]:
    """One line per kind of matched module: `q_proj x30 (576->576)`."""
    kinds = Counter((n.rsplit(".", 1)[-1], i, o) for n, i, o, _ in report.modules)
    return [f"{name} x{count} ({i}->{o})" for (name, i, o), count in kinds.items()]


def dry_run(overrides: list[str]) -> dict[str, Any]:
    """Check and size the run `lorafit train OVERRIDES` would do, and print what a run would
    train. Reads the tokenizer, config.json and the data; loads no weights, writes no run folder.

    Returns:
        The figures printed: `matched_modules`, `trainable_params`, `total_params`,
        `train_examples`, `val_examples`, `steps_per_epoch`, `total_steps`, `micro_batch_size`,
        `accumulate`, `world_size`, `batch_shape`, `memory`.

    Raises:
        ValueError: bad input, named as a run would name it (config key, data file, targets).
    """
    cfg = compose_dry(overrides)
    task = validate(cfg)
    model_cfg: ModelConfig = group_object(ModelConfig, cfg.model, "model")
    lora: LoRAConfig = group_object(LoRAConfig, cfg.lora, "lora")
    model_dir = resolve_model_dir(model_cfg)
    tokenizer = load_tokenizer(model_dir, model_cfg)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    datamodule.setup("fit")

    model = meta_model(model_dir, model_cfg, task, datamodule)
    trainable_like_a_run(model, lora, task.head_names(model))
    report = lora_report(model)

    devices = world_size(cfg.trainer)
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    datamodule.batch_size, datamodule.accumulate = step_shape(
        datamodule.global_batch_size, datamodule.batch_size, accumulate, devices
    )
    loader = datamodule.train_dataloader()
    step = next(iter(loader), None)
    if step is None:
        raise ValueError("The training split yields no batch: give more data.")
    batch = step[0] if isinstance(step, list | tuple) else step  # a step of micro-batches
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    n_train = datamodule.train_set
    figures = {
        "matched_modules": len(report.modules),
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "train_examples": len(n_train) if hasattr(n_train, "__len__") else None,
        "val_examples": len(datamodule.val_set) if hasattr(datamodule, "val_set") else None,
        "steps_per_epoch": per_epoch,
        "total_steps": total_steps(cfg.trainer, per_epoch),
        "micro_batch_size": datamodule.batch_size,
        "accumulate": datamodule.accumulate,
        "world_size": devices,
        "batch_shape": list(batch["input_ids"].shape),
        "memory": memory_figure(cfg, report, batch),
    }
    print_summary(cfg, model_dir, report, figures)
    return figures


def print_summary(cfg: DictConfig, model_dir: str, report: LoRAReport, f: dict[str, Any]) -> None:
    per_step = f["micro_batch_size"] * f["accumulate"] * f["world_size"]
    matched = ", ".join(modules_summary(report)) or "none (lora=none: every weight trains)"
    unknown = "unknown (streamed)"
    data = HydraConfig.get().runtime.choices.get("data")
    lines = [
        f"dry run: model={cfg.model.name} ({model_dir}), data={data}",
        f"  matched modules: {f['matched_modules']}: {matched}",
        f"  trainable params: {f['trainable_params']:,} of {f['total_params']:,} "
        f"({100 * f['trainable_params'] / max(1, f['total_params']):.4f}%)",
        f"  examples: {f['train_examples'] if f['train_examples'] is not None else unknown} "
        f"train, {f['val_examples']} validation",
        f"  one optimizer step: {per_step} example(s) = {f['accumulate']} micro-batch(es) of "
        f"{f['micro_batch_size']} on each of {f['world_size']} device(s); first micro-batch "
        f"input_ids {tuple(f['batch_shape'])}",
        f"  steps: {f['steps_per_epoch'] or unknown} per epoch, "
        f"{f['total_steps'] or unknown} in all",
        f"  memory (lorafit estimate): {f['memory'] or 'not available yet'}",
        f"  run folder (not created): {HydraConfig.get().runtime.output_dir}",
    ]
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    """`lorafit train --dry-run ARGV`: 0 when the run would start, 1 (one clear message) when
    not."""
    overrides = [a for a in argv if a not in FLAGS]
    if any(a.startswith("-") for a in overrides):
        print(
            f"\nlorafit: error: --dry-run checks one run from overrides only; drop "
            f"{', '.join(a for a in overrides if a.startswith('-'))}.\n",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        dry_run(overrides)
    except (ValueError, OSError, ConfigCompositionException, InstantiationException) as e:
        if isinstance(e, InstantiationException) and isinstance(e.__cause__, ValueError | OSError):
            e = e.__cause__  # a config object refused its values: that message is the one to see
        elif isinstance(e, InstantiationException):
            raise
        print(f"\nlorafit: error: {e}\n", file=sys.stderr)
        return 1
    return 0
