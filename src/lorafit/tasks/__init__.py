"""Tasks: what differs between causal-LM and classification fine-tuning; train.py does the rest.

`cfg.task` picks an entry of `TASKS`. Adding a task is a new module here and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorafit.module import LoRAModule
from lorafit.tasks import classification


@dataclass(frozen=True)
class Task:
    """One task's pieces.

    Attributes:
        module: the LightningModule class (`LoRAModule` or a subclass), built as
            `module(model, optimizer=..., scheduler=...)`.
        peft_task_type: PEFT's `task_type` written in `adapter_config.json`.
        loss_label: y-axis label of `loss_curve.png`.
        heads: last names of new output modules trained fully and saved whole (PEFT's
            `modules_to_save`); PEFT adds `classifier` and `score` itself for `SEQ_CLS`.
        model_kwargs: `datamodule -> from_pretrained kwargs` (e.g. `num_labels` from the data).
        after_fit: `(trainer, module, datamodule, run_dir) -> dict` of extra metrics.json entries
            (test-split metrics, pictures), or None.
    """

    module: type[LoRAModule]
    peft_task_type: str
    loss_label: str
    heads: tuple[str, ...] = ()
    model_kwargs: Callable[[Any], dict[str, Any]] = lambda datamodule: {}
    after_fit: Callable[..., dict[str, Any]] | None = None

    def head_names(self, model: nn.Module) -> list[str]:
        """Full names of the modules of `model` whose last name part is one of `heads`."""
        return [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in self.heads]


TASKS: dict[str, Task] = {
    "causal_lm": Task(LoRAModule, "CAUSAL_LM", "loss per supervised token (nats)"),
    "classification": Task(
        classification.ClassificationModule,
        "SEQ_CLS",
        "cross-entropy per example (nats)",
        heads=("classifier", "score"),
        model_kwargs=classification.model_kwargs,
        after_fit=classification.after_fit,
    ),
}


def get_task(name: str) -> Task:
    """The `TASKS` entry for `cfg.task`.

    Raises:
        ValueError: unknown task name (lists the known ones).
    """
    if name not in TASKS:
        raise ValueError(f"task='{name}' is unknown; set task= one of {sorted(TASKS)}.")
    return TASKS[name]
