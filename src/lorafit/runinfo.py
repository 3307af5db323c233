"""Provenance of a run (git commit, versions, memory, config hash) and the one way lorafit writes
files: atomically, so an interrupted or failed write never leaves a half-written file or folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

# -- atomic writes ---------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path`: a temp file in the same folder, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a part; on any error the temp file is removed
    and `path` is untouched. The folder must exist.

    Returns:
        `path` as a Path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG with `atomic_write` and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


@contextmanager
def staged_dir(out: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Build a folder in a hidden temp folder beside `out`, then move it into place.

    Yields the temp folder. When the block ends without error the temp folder becomes `out`; an
    existing `out` is moved aside first and removed after (`replace=True`), or kept and the new
    one discarded (`replace=False`: another process made it first, e.g. a parallel sweep job
    filling a cache). On error the temp folder is removed and `out` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists() and not replace:
            shutil.rmtree(tmp)
            return
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- provenance ------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """HEAD of the lorafit checkout, with `-dirty` when it has uncommitted changes; None for an
    installed wheel (no checkout) or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
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
    """Versions of Python and of the libraries a run's numbers depend on (read from the installed
    distributions' metadata, so nothing is imported for it)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "hydra-core", "lorafit"):
        try:
            out[name.removesuffix("-core")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.removesuffix("-core")] = "not installed"
    return out


def config_hash(cfg: Any) -> str:
    """sha256 of the resolved run config (an OmegaConf node), first 16 hex digits."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- memory ----------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (Linux >= 4.0: VmHWM), so runs that share a sweep
    process are not mixed; elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since `reset_peak_rss`, else since the process started.

    psutil reports the peak where the OS keeps one (`peak_wset` on Windows); on Linux it has no
    peak field, so the kernel's VmHWM is read, and RSS now is the floor elsewhere.
    """
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
