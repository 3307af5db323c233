"""Peak resident memory of a run: the kernel's peak count (Linux VmHWM), restartable, and a
per-phase table (load, validate, fit, samples, save) for metrics.json `memory_phases`."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import psutil

# What `peak_rss_mb` covers: set by `reset_peak_rss`, recorded beside it in metrics.json.
_peak_since = {"event": "process start"}


def _release_free_memory() -> None:
    """Collect garbage (an earlier run's objects held in reference cycles) and hand freed heap
    pages back to the OS (glibc's malloc_trim), so they are not counted as this run's memory."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def reset_peak_rss(since: str = "run start", scope: bool = True) -> bool:
    """Restart the kernel's peak-RSS count (Linux >= 4.0: VmHWM) after freeing what is garbage.

    A run calls it at its start and again once the model is loaded, so its `peak_rss_mb` holds
    neither the one-time GGUF conversion nor what earlier runs of a sequential multirun left.

    Args:
        since: the event the count now starts at, for `peak_rss_scope`.
        scope: record `since` as the scope (False: a phase of `MemoryPhases` restarts the count
            inside a scope that stays as it was).

    Returns:
        False where the count cannot be reset (not Linux): the peak then counts from the process
        start, and `peak_rss_scope` says so.
    """
    _release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    if scope:
        _peak_since["event"] = since
        _phase_peaks.clear()
    return True


def peak_rss_scope() -> str:
    """What `peak_rss_mb` covers now, e.g. `process peak since model load` (metrics.json's
    `peak_rss_scope`: runs compare by `peak_rss_mb` only when it is the same)."""
    return f"process peak since {_peak_since['event']}"


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last `reset_peak_rss` that worked, else since the
    process started (see `peak_rss_scope`).

    psutil reports the peak where the OS keeps one (`peak_wset` on Windows); on Linux it has no
    peak field, so the kernel's VmHWM is read, and RSS now is the floor elsewhere.
    """
    return max([_kernel_peak_mb(), *(b / 2**20 for b in _phase_peaks)])


def _kernel_peak_mb() -> float:
    """The OS's peak RSS since its count last restarted (or RSS now, where it keeps none), MiB."""
    mem = psutil.Process().memory_info()
    peak = getattr(mem, "peak_wset", None)
    if peak is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        except OSError:
            pass
    return max(peak or 0, mem.rss) / 2**20


_phase_peaks: list[int] = []  # bytes: peaks of the phases ended since the scope began


def rss_mb() -> float:
    """Resident memory now, MiB."""
    return psutil.Process().memory_info().rss / 2**20


class MemoryPhases:
    """Peak resident memory per phase of a run (metrics.json `memory_phases`, MiB).

    `start(name)` ends the phase before it and restarts the kernel's peak count (VmHWM, after
    freeing garbage), so each phase's peak is its own; `peak_rss_mb` stays the peak over every
    phase since its scope began. Where the count cannot be restarted (not Linux) a phase's peak
    is the process peak so far.
    """

    def __init__(self) -> None:
        self.table: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._start = 0.0

    def start(self, name: str) -> None:
        """End the current phase (if any) and begin `name`."""
        self.stop()
        reset_peak_rss(name, scope=False)
        self._name, self._start = name, rss_mb()

    def stop(self) -> None:
        """End the current phase: record its RSS at start and end and its peak."""
        if self._name is None:
            return
        peak = _kernel_peak_mb()
        _phase_peaks.append(int(peak * 2**20))
        self.table[self._name] = {
            "start_mb": round(self._start, 1),
            "peak_mb": round(peak, 1),
            "end_mb": round(rss_mb(), 1),
        }
        self._name = None
