"""Sequence classification: labelled texts -> a transformers `...ForSequenceClassification` model.

The base encoder gets LoRA layers (or is trained fully with `lora=none`); the new classifier head is
trained fully and saved whole in the adapter, as PEFT's `modules_to_save` does. The data module is
`lorafit.data.classification.ClassificationDataModule`. Metrics are computed from one confusion
matrix per stage: accuracy, macro-F1 and per-class F1 (F1 = 2 TP / (2 TP + FP + FN),
scikit-learn's definition, 0 for a class with no true and no predicted examples).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from lorafit.models import label_kwargs
from lorafit.runinfo import readable_ticks, write_figure
from lorafit.tasks.base import LoRAModule

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Metrics and the LightningModule


def classification_metrics(num_classes: int) -> MetricCollection:
    """torchmetrics' accuracy, macro-F1, per-class F1 and confusion matrix over `num_classes`.

    F1 = 2 TP / (2 TP + FP + FN) per class; macro-F1 is their unweighted mean (a class with
    neither true nor predicted examples has no F1 and is left out of the mean: torchmetrics'
    rule). The confusion matrix has rows = true class, columns = predicted.
    """
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "f1_per_class": MulticlassF1Score(num_classes, average="none"),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }
    )


def plain_results(values: dict[str, torch.Tensor], label_names: list[str]) -> dict[str, Any]:
    """A computed `classification_metrics` collection as JSON-ready values: floats,
    `f1_per_class` as {name: F1} and `confusion` as nested lists of ints."""
    return {
        "accuracy": float(values["accuracy"]),
        "macro_f1": float(values["macro_f1"]),
        "f1_per_class": {
            name: float(v) for name, v in zip(label_names, values["f1_per_class"], strict=True)
        },
        "confusion": values["confusion"].long().tolist(),
    }


class ClassificationModule(LoRAModule):
    """LoRAModule with a cross-entropy loss over classes and confusion-matrix metrics.

    The optimizer, scheduler, timing and trainable-only checkpoints are LoRAModule's. Class names
    come from `model.config.id2label`. After each validation/test epoch `results[stage]` holds
    `plain_results(...)` of `classification_metrics` plus `loss`.

    Args:
        model: a transformers sequence classifier (LoRA injected, head trainable).
        optimizer, scheduler, gradient_clip_val: as for LoRAModule.
    """

    name = "classification"
    peft_task_type = "SEQ_CLS"
    loss_label = "cross-entropy per example (nats)"
    # New output modules, trained whole and saved as modules_to_save: BERT/RoBERTa `classifier`
    # (RoBERTa's holds dense + out_proj), decoders' `score`, DistilBERT's new `pre_classifier`.
    heads = ("classifier", "score", "pre_classifier")

    def __init__(self, model: nn.Module, optimizer, **kwargs: Any):
        super().__init__(model, optimizer, **kwargs)  # scheduler, clipping, non-finite skips
        n = model.config.num_labels
        self.label_names = [str(model.config.id2label[i]) for i in range(n)]
        self.metrics = nn.ModuleDict({s: classification_metrics(n) for s in ("val", "test")})
        self.test_loss = MeanMetric()  # per-example mean; val_loss is LoRAModule's
        self.results: dict[str, dict[str, Any]] = {}

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @staticmethod
    def loss_count(batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"])
        mean = self.val_loss if stage == "val" else self.test_loss
        mean.update(loss, weight=len(batch["labels"]))
        self.metrics[stage].update(logits.argmax(-1), batch["labels"])

    def _eval_epoch_end(self, stage: str) -> None:
        mean = self.val_loss if stage == "val" else self.test_loss
        loss = float(mean.compute())
        values = self.metrics[stage].compute()
        mean.reset()
        self.metrics[stage].reset()
        res = {"loss": loss, **plain_results(values, self.label_names)}
        self.results[stage] = res
        for key in ("loss", "accuracy", "macro_f1"):
            # equal on every rank already; sync_dist only tells Lightning so
            self.log(f"{stage}/{key}", res[key], prog_bar=True, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @staticmethod
    def model_kwargs(datamodule) -> dict[str, Any]:
        """`from_pretrained` kwargs that size the new head for the data's labels."""
        return label_kwargs(datamodule.label_names)

    def after_fit(self, trainer: L.Trainer, datamodule, run_dir: Path) -> dict[str, Any]:
        """Evaluate on the test split (every rank takes part), draw `confusion_matrix.png` (rank 0);
        returns metrics.json entries."""
        trainer.test(self, datamodule=datamodule, verbose=False)
        test, val = self.results["test"], self.results["val"]
        if not trainer.is_global_zero:
            return {}
        plot_confusion_matrix(
            test["confusion"],
            self.label_names,
            run_dir / "confusion_matrix.png",
            f"test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}",
        )
        return {
            "labels": self.label_names,
            "eval_f1_per_class_after": val["f1_per_class"],
            **{f"test_{k}": test[k] for k in ("loss", "accuracy", "macro_f1", "f1_per_class")},
            "test_confusion_matrix": test["confusion"],
        }


def plot_confusion_matrix(confusion: list[list[int]], names: list[str], path: Path, title: str):
    """Confusion matrix (rows true, columns predicted) with counts in the cells, saved as PNG.

    The colour scale runs from 0 to the largest count in whole numbers, so equal counts are not
    stretched over a scale of fractions around them.

    Returns:
        The matplotlib figure (saved and closed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.1 * n + 1.8))
    top = max(max(row) for row in confusion) or 1
    im = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=top)
    for i in range(n):
        for j in range(n):
            color = "white" if confusion[i][j] > top / 2 else "black"
            ax.text(j, i, confusion[i][j], ha="center", va="center", color=color)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, ticks=MaxNLocator(nbins=5, integer=True))
    readable_ticks(fig)
    fig.tight_layout()
    write_figure(fig, path)
    return fig
