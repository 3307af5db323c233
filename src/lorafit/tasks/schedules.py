"""The learning-rate schedule of the `scheduler` config group (`_target_` in conf/scheduler/)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    name: str = "cosine_with_min_lr",
    warmup_ratio: float = 0.0,
    **kwargs: Any,
) -> LRScheduler:
    """transformers' schedule `name` (`get_scheduler`) with the warmup given as a share of steps.

    A ratio follows `trainer.max_steps` / epoch changes, where a fixed count would not (Lightning
    knows the step count only once fitting starts). With W = `ceil(warmup_ratio *
    num_training_steps)` warmup steps, optimizer step s (from 0) runs at min(1, (s + 1) / W) of the
    learning rate, then `name` takes over: `cosine_with_min_lr` (decay to `min_lr_rate` x lr at
    the last step), `constant_with_warmup`, `linear`, ...

    The schedule starts one step in (transformers' step 0 has learning rate 0, so its first
    optimizer step would change nothing, and a 1-step run would train nothing at all).

    Args:
        kwargs: the schedule's own arguments (`min_lr_rate`, `num_cycles`, ...), passed on as
            transformers' `scheduler_specific_kwargs`.
    """
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(num_training_steps * warmup_ratio),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs or None,
    )
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return scheduler
