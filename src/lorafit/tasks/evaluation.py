"""Validation around a fit, without repeating work: the metrics before training come from a cache
keyed by what decides them (base model files, validation data, precision, ...), so the runs of a
sweep over rank or alpha compute them once; the metrics after training reuse the fit's own last
validation when it ran on the final weights.

Why the cache key may leave the LoRA settings out: a LoRA layer starts equal to its base (B = 0,
and DoRA's magnitude starts at the weight's norm), so before training every run on the same base
and data scores the same whatever `r`, `lora_alpha` or `target_modules`; PiSSA / OLoRA move the
base's top singular directions into A and B, equal only to rounding, so their `lora.init` is in
the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
import transformers
from omegaconf import OmegaConf

from lorafit import runinfo
from lorafit.models import cache_dir

log = logging.getLogger(__name__)


def _files_signature(model_dir: str) -> list | None:
    """Name, size and modification time of a local model folder's files; None for a hub id."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
    )


def before_cache_key(cfg, datamodule, model_dir: str, world_size: int) -> str | None:
    """The cache key of a run's before-training metrics, or None when they must be computed
    (`eval.cache_before: false`, several devices, a hub model, streamed data or data without a
    fingerprint)."""
    node = cfg.get("eval") or {}
    if not node.get("cache_before", True) or world_size != 1:
        return None
    files = _files_signature(model_dir)
    fingerprint = getattr(datamodule, "stats", {}).get("fingerprint_val")
    if files is None or fingerprint is None:
        return None
    lora_init = cfg.get("lora", {}).get("init", "default") if cfg.get("lora") else None
    parts = {
        "files": files,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "val": fingerprint,
        "eval_batch_size": getattr(datamodule, "eval_batch_size", None),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None,
        "lora_init": None if lora_init == "default" else lora_init,
        "trainer": {k: str(cfg.trainer.get(k)) for k in ("precision", "limit_val_batches")},
        "versions": (torch.__version__, transformers.__version__),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class RunEvaluation:
    """Before/after metrics of one run (`{"eval_loss": ..., "general_loss": ...}`).

    Args:
        trainer, module, datamodule: the run's.
        general: the forgetting probe (`lorafit.tasks.general.GeneralLoss`), called as
            `general(trainer, model)`.
        key: `before_cache_key(...)`, or None: no cache.
    """

    def __init__(self, trainer: L.Trainer, module, datamodule, general, key: str | None):
        self.trainer, self.module, self.datamodule = trainer, module, datamodule
        self.general, self.key = general, key
        self.cached_before = False

    def validate(self) -> dict[str, float]:
        """Validation metrics now, as `{"eval_loss": ..., "eval_accuracy": ...}`."""
        out = self.trainer.validate(self.module, datamodule=self.datamodule, verbose=False)[0]
        return {k.replace("val/", "eval_", 1): float(v) for k, v in out.items()}

    def before(self) -> dict[str, float]:
        """Metrics of the untrained model: from the cache when this base and data were scored
        before, else computed (and cached)."""
        path = cache_dir() / ".eval_before" / f"{self.key}.json" if self.key else None
        if path is not None and path.is_file():
            try:
                metrics = json.loads(path.read_text())
            except (OSError, ValueError):  # unreadable: computed again and rewritten
                metrics = None
            if metrics is not None:
                self.cached_before = True
                log.info("Metrics before training: from the cache (%s): %s", path, metrics)
                logged = {
                    "val/" + k[5:]: v for k, v in metrics.items() if k.startswith("eval_")
                }  # as a validation now would log them (loss curves start from them)
                for logger in self.trainer.loggers:
                    logger.log_metrics(logged, step=self.trainer.global_step)
                return metrics
        metrics = {**self.validate(), **self.general(self.trainer, self.module.model)}
        if path is not None and self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            runinfo.atomic_write(path, json.dumps(metrics))
        return metrics

    def after(self) -> dict[str, float]:
        """Metrics of the trained model: the fit's last validation when it ran on these weights
        (at the final step, over the same batches), else a new validation."""
        last = getattr(self.module, "last_fit_validation", None)
        if last is not None and last[0] == self.trainer.global_step:
            metrics = {k.replace("val/", "eval_", 1): v for k, v in last[1].items()}
            log.info("Metrics after training: the fit's validation at step %d.", last[0])
        else:
            metrics = self.validate()
        return {**metrics, **self.general(self.trainer, self.module.model)}
