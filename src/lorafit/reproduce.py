"""`lorafit reproduce RUN_DIR`: re-run a finished run from its folder and compare the results.

The rerun composes the run's own `.hydra/config.yaml` (not today's `conf/`), with the torch thread
count the run recorded, into `RUN_DIR/reproduce/`. On CPU (deterministic algorithms on) the same
code, packages and thread count give bit-identical numbers; see README for what differs on GPUs.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

# Results that must match exactly, and the circumstances that explain a mismatch.
COMPARED = [
    "eval_loss_before",
    "eval_loss_after",
    "eval_accuracy_before",
    "eval_accuracy_after",
    "general_loss_before",
    "general_loss_after",
    "trainable_params",
    "train_steps",
    "train_tokens",
    "data_fingerprint",
]
CONTEXT = ["git_commit", "versions", "torch_threads", "device", "deterministic"]


def rerun(run_dir: Path, out: Path) -> subprocess.CompletedProcess:
    """Train again from `run_dir/.hydra/config.yaml` into `out` (replaced if it exists)."""
    threads = json.loads((run_dir / "metrics.json").read_text()).get("torch_threads")
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "lorafit.train",
        "--config-path",
        str((run_dir / ".hydra").resolve()),
        "--config-name",
        "config",
        f"hydra.run.dir={out.resolve()}",
    ]
    if threads:
        cmd.append(f"++threads={threads}")
    return subprocess.run(cmd, text=True)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(old: dict, new: dict) -> tuple[bool, str]:
    """(all results identical, a table of results and of differing circumstances)."""
    lines = [f"{'metric':<22} {'original':>22} {'rerun':>22}  same"]
    ok = True
    for k in COMPARED:
        if k not in old and k not in new:
            continue
        a, b = old.get(k), new.get(k)
        ok &= same(a, b)
        lines.append(
            f"{k:<22} {str(a)[:22]:>22} {str(b)[:22]:>22}  {'yes' if same(a, b) else 'NO'}"
        )
    diff = [k for k in CONTEXT if old.get(k) != new.get(k)]
    for k in diff:
        lines.append(f"differs: {k}: {old.get(k)} -> {new.get(k)}")
    return ok, "\n".join(lines)


def reproduce(run_dir: str | Path, out: str | Path | None = None) -> int:
    """Re-run `run_dir` and print the comparison. Returns 0 when identical, 1 otherwise.

    Raises:
        ValueError: `run_dir` is not a finished run folder.
    """
    run_dir = Path(run_dir)
    for need in [".hydra/config.yaml", "metrics.json"]:
        if not (run_dir / need).is_file():
            raise ValueError(
                f"{run_dir / need} not found: give a finished run folder (one with metrics.json "
                "and .hydra/config.yaml, written by `lorafit train`)."
            )
    out = Path(out) if out else run_dir / "reproduce"
    proc = rerun(run_dir, out)
    if proc.returncode != 0 or not (out / "metrics.json").is_file():
        print(f"lorafit: the rerun failed (exit {proc.returncode}); see {out}", file=sys.stderr)
        return 1
    old = json.loads((run_dir / "metrics.json").read_text())
    new = json.loads((out / "metrics.json").read_text())
    identical, table = compare(old, new)
    print(table)
    print(
        f"\nReproduced: identical results ({out})"
        if identical
        else f"\nNOT reproduced: results differ ({out})"
    )
    return 0 if identical else 1


def resume_argv(argv: list[str]) -> list[str]:
    """`lorafit train resume=RUN_DIR [overrides]` -> the run's own overrides, continued in place.

    An interrupted run (Ctrl-C, SIGTERM, a crash, a kill) goes on in its folder from
    `checkpoints/last.ckpt` with the overrides it was started with (`.hydra/overrides.yaml`), so
    the same data order and the same steps follow; overrides given here win over the saved ones
    (e.g. more `trainer.max_steps`). Without `resume=`, `argv` comes back unchanged.

    Raises:
        ValueError: RUN_DIR is not a run folder, has no checkpoint, or finished already.
    """
    given = [a for a in argv if a.lstrip("+").startswith("resume=")]
    if not given:
        return argv
    run_dir = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    saved_file, ckpt = run_dir / ".hydra/overrides.yaml", run_dir / "checkpoints/last.ckpt"
    if not saved_file.is_file():
        raise ValueError(
            f"resume={run_dir}: not a run folder (no .hydra/overrides.yaml). Give the folder "
            "`lorafit train` wrote, e.g. resume=outputs/2026-11-30/10-00-00."
        )
    if (run_dir / "metrics.json").is_file():
        raise ValueError(f"resume={run_dir}: that run finished (metrics.json exists).")
    if not ckpt.is_file():
        raise ValueError(
            f"resume={run_dir}: no checkpoints/last.ckpt to resume from (the run stopped before "
            "its first checkpoint, or ran with callbacks=none): start it again instead."
        )
    import yaml

    # Hydra rewrites overrides.yaml at every start: resume from the run's first overrides, so that
    # a resume that failed with a wrong extra override does not become part of the run.
    first = saved_file.with_name("overrides.before_resume.yaml")
    if not first.is_file():
        first.write_text(saved_file.read_text())
    extra = [a for a in argv if a not in given]
    keys = {a.lstrip("+~").split("=", 1)[0] for a in extra}
    saved = [
        o
        for o in yaml.safe_load(first.read_text()) or []
        if o.lstrip("+~").split("=", 1)[0] not in keys | {"ckpt_path", "resume"}
    ]
    logged = run_dir / "csv/metrics.csv"  # Lightning's CSV logger starts it anew: set it aside
    if logged.is_file():
        n = 1 + len(list(logged.parent.glob("metrics.part*.csv")))
        logged.rename(logged.with_name(f"metrics.part{n}.csv"))
    return [*saved, *extra, f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}"]
