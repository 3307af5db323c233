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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# -- atomic writes ---------------------------------------------------------------------------------


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so the renames and new names in it survive a power cut (POSIX; a no-op
    where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for writing in binary; when the block ends without error,
    flush, fsync, rename it over `path` and fsync the folder (for writers that stream, e.g.
    `torch.save(obj, fh)`, so a large checkpoint is not held in memory twice).

    On any error (disk full, permission, an interrupt) the temp file is removed and `path` is
    untouched. The folder must exist.

    Raises:
        OSError: The write, fsync or rename failed (`path` untouched).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` with `atomic_writer`: a temp file in the same folder, flush, fsync,
    rename over `path`, fsync the folder.

    The one file writer of lorafit (Lightning's checkpoint writes go through it too). A reader sees
    the old file or the new one, never a part; on any error the temp file is removed and `path`
    is untouched.

    Args:
        path: The file to create or replace; its folder must exist.
        data: Its content; a `str` is written as UTF-8.

    Returns:
        `path` as a Path.

    Raises:
        OSError: The write, fsync or rename failed (`path` untouched).
    """
    with atomic_writer(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_files(folder: str | os.PathLike, files: Mapping[str, bytes | str]) -> Path:
    """Write a set of files into `folder` so that a failure leaves the old set whole.

    A new folder is built with `staged_dir` (it appears complete or not at all). In an existing
    folder (other files there are kept) every file is first written in full to a temp file and
    fsynced; only then are they renamed over the old ones, in the order given (put the file a
    reader checks first, e.g. a config, last). A failure while writing (disk full, permission)
    therefore changes nothing; what is left is only the tiny window of the renames themselves.

    Args:
        folder: The folder to create or update.
        files: File name (no folder part) -> content; a `str` is written as UTF-8.

    Returns:
        `folder` as a Path.

    Raises:
        OSError: A write failed (`folder` as it was, no temp file left).
    """
    folder = Path(folder)
    if not folder.exists():
        with staged_dir(folder) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return folder
    written: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            written.append((name, Path(tmp)))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
        for name, tmp in written:
            os.replace(tmp, folder / name)
    except BaseException:
        for _, tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return folder


def compact_number(value: float, _pos: object = None) -> str:
    """A tick label that reads as the value itself: `950`, `1.5k`, `184.32k`, `2M`, `0.25`."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.6g}{suffix}"
    return f"{value:.6g}"


def readable_ticks(fig) -> None:
    """Make every numeric axis of `fig` show at least two tick labels, each the plain value at its
    tick (no offset or `1e5` to add in the reader's head), whatever the data's range.

    Matplotlib hides numbers in two ways: a log axis spanning less than a decade holds no labelled
    (power of ten) tick, and a nearly flat axis shows `0, 2, 4` plus an offset `1e-5+2.345`.
    Axes with set ticks (class names) or none (a colorbar's short side) are left alone.
    """
    from matplotlib import ticker

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), ticker.NullLocator | ticker.FixedLocator):
                continue
            formatter = axis.get_major_formatter()
            if isinstance(formatter, ticker.ScalarFormatter):
                formatter.set_useOffset(False)
                formatter.set_scientific(False)
    fig.canvas.draw()  # locate and label the ticks for the view the data gave
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), ticker.NullLocator | ticker.FixedLocator):
                continue
            lo, hi = sorted(axis.get_view_interval())
            shown = [
                loc
                for minor in (False, True)
                for loc, label in zip(
                    axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor), strict=True
                )
                if label.get_text() and lo <= loc <= hi
            ]
            if len(shown) < 2:  # e.g. log scale within one decade: evenly spaced plain ticks
                axis.set_major_locator(ticker.MaxNLocator(nbins=4, min_n_ticks=2))
                axis.set_minor_locator(ticker.NullLocator())
                if isinstance(axis.get_major_formatter(), ticker.LogFormatter):
                    axis.set_major_formatter(ticker.FuncFormatter(compact_number))


def write_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG with `atomic_write` and close it (the figure object stays
    readable, e.g. for a test to look at its ticks)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


@contextmanager
def staged_dir(out: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Build a folder in a hidden temp folder beside `out`, then move it into place.

    The one folder writer of lorafit (an adapter, a full model, a merged export, the model
    cache). Yields the temp folder. When the block ends without error every file in it is
    fsynced and the temp folder becomes `out`; an existing `out` is moved aside first and removed
    only once the new one is in place (`replace=True`), or kept and the new one discarded
    (`replace=False`: another process made it first, e.g. a parallel sweep job filling a cache).
    On error (in the block or while moving) the temp folder is removed and `out` is as it was.
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
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the old folder back
                os.replace(old / out.name, out)
                old.rmdir()
            raise
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (what a library such as transformers wrote
    there with plain writes), so the rename that publishes it never points at lost data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


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


# Peak resident memory lives in lorafit.memory; these names stay here for existing callers.
from lorafit.memory import (  # noqa: E402
    MemoryPhases,
    peak_rss_mb,
    peak_rss_scope,
    reset_peak_rss,
    rss_mb,
)

__all__ = ["MemoryPhases", "peak_rss_mb", "peak_rss_scope", "reset_peak_rss", "rss_mb"]


# -- hardware --------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86: AVX-512 BF16 or AMX tiles).

    Without it, bf16 autocast on the CPU is emulated: slower than float32, not faster. False where
    torch offers no probe (e.g. ARM), so the safe float32 is chosen there.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
