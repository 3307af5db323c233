"""Training faults: a non-finite loss or gradient, Ctrl-C / SIGTERM, and the random state a resumed
run needs to go on exactly where it stopped.

Both kinds of stop happen at a step boundary, after an optimizer step and with the data loader's
position matching it, so `checkpoints/last.ckpt` taken there resumes to the adapter an
uninterrupted run would have ended with.
"""

from __future__ import annotations

import io
import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lorafit.runinfo import atomic_write

log = logging.getLogger("lorafit")

SIGNAL_CODES = {None: 0, "SIGINT": 1, "SIGTERM": 2}  # reduced with max over the ranks


class RunInterrupted(Exception):  # noqa: N818 (a stop the user asked for, not an error)
    """Ctrl-C or SIGTERM stopped training at a step boundary, after saving a checkpoint.

    Attributes:
        signal_name: `SIGINT` or `SIGTERM`; `step` the optimizer steps done; `checkpoint` the
            path of the checkpoint saved at that step (None without a checkpoint callback).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (callbacks=none)"
        super().__init__(f"{signal_name} at step {step}: stopped after this step; {where}.")


class NonFiniteError(ValueError):
    """A non-finite loss or gradient norm, more often than `trainer.skip_nonfinite_batches`."""


class SignalWatch:
    """Ctrl-C during `fit` asks for a stop at the next step boundary instead of ending the process
    mid-step; a second Ctrl-C ends it at once. SIGTERM (a scheduler's preemption) is Lightning's:
    its handler sets `trainer.received_sigterm`, read here the same way.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: Any = None

    def start(self) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        self.received = "SIGINT"
        log.warning("Ctrl-C: stopping after this step with a checkpoint (again: stop now).")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, trainer) -> str | None:
        """The signal that asks this run to stop, agreed by every rank (one all-reduce under DDP,
        so that all ranks stop at the same step), or None."""
        name = self.received or ("SIGTERM" if trainer.received_sigterm else None)
        if trainer.world_size == 1:
            return name
        code = torch.tensor(SIGNAL_CODES[name], device=trainer.strategy.root_device)
        code = int(trainer.strategy.reduce(code, reduce_op="max"))
        return {v: k for k, v in SIGNAL_CODES.items()}[code]


def nonfinite_report(
    step: int,
    indices: list[int] | None,
    loss: float,
    grad_norm: float,
    checkpoint: tuple[str, int] | None,
    skipped: int,
    allowed: int,
) -> str:
    """The message of a non-finite step: which step, which examples, what to resume from."""
    where = (
        f"examples {indices[:16]}{' ...' if len(indices) > 16 else ''} of the training split"
        if indices
        else "examples of a streamed split (no row numbers)"
    )
    last = (
        f"last good checkpoint: {checkpoint[0]} (step {checkpoint[1]})"
        if checkpoint
        else "no checkpoint saved yet"
    )
    return (
        f"Non-finite training step {step + 1}: loss {loss}, gradient norm {grad_norm}, on {where}; "
        f"{last}. {skipped} such step(s) so far, trainer.skip_nonfinite_batches={allowed} allowed: "
        "lower optimizer.lr, keep trainer.gradient_clip_val, check those examples, or set "
        "trainer.skip_nonfinite_batches=N to skip up to N such steps."
    )


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, Python, NumPy), for a checkpoint."""
    # plain types only: Lightning loads checkpoints with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Back to the generators of `rng_state()`: dropout masks go on as in an uninterrupted run."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `lorafit.runinfo.atomic_write`: a save that fails
    (disk full, a kill) leaves the previous `last.ckpt` whole, where Lightning's own writer
    truncates it before writing the new bytes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())
