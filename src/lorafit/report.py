"""`lorafit report MULTIRUN_DIR`: a sweep's run folders -> summary.csv, summary.md, tradeoff.png.

Everything is rebuilt from the run folders alone (`.hydra/`, `metrics.json`, `failed.json`), so a
report needs no tracker. A folder with neither `metrics.json` nor `failed.json` is an unfinished or
killed run and is listed as `missing`. `ReportCallback` writes the report when a multirun ends.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lorafit import study_report
from lorafit.analyze.sweep import add_effective_ranks, markdown_section, plot_forgetting
from lorafit.runinfo import atomic_write, compact_number, readable_ticks, write_figure

log = logging.getLogger("lorafit")

# summary.csv columns, in order (summary.md's table shows the same minus the long texts).
COLUMNS = [
    "run",
    "overrides",
    "status",
    "r",
    "alpha",
    "targets",
    "trainable_params",
    "adapter_bytes",
    "effective_rank",  # median over layers of ΔW's directions holding 90 % of its energy
    "eval_loss_before",
    "eval_loss_after",
    "eval_accuracy_before",
    "eval_accuracy_after",
    "general_loss_before",  # loss on text outside the task (forgetting; causal_lm runs)
    "general_loss_after",
    "train_seconds",
    "tokens_per_s",
    "peak_rss_mb",
    "peak_rss_scope",
    "pareto",
    "best",
    "error",
]


def find_runs(root: Path) -> list[Path]:
    """Run folders under `root` (folders with `.hydra/config.yaml`), in job-number order.

    A run folder inside another one (e.g. the `reproduce/` rerun of `lorafit reproduce`) is not a
    run of the sweep and is left out.
    """
    found = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")})
    runs = [d for d in found if not any(a in found for a in d.parents)]

    def key(d: Path) -> tuple:
        return tuple(
            (0, int(p), "") if p.isdigit() else (1, 0, p) for p in d.relative_to(root).parts
        )

    return sorted(runs, key=key)


def _targets(value: Any) -> str:
    if value is None:
        return "full"  # lora=none: every weight trained
    return ",".join(value) if isinstance(value, list) else str(value)


def _from_config(run_dir: Path) -> dict[str, Any]:
    """r / alpha / targets of a run without metrics, from its composed `.hydra/config.yaml`."""
    cfg = OmegaConf.load(run_dir / ".hydra/config.yaml")

    def pick(key: str) -> Any:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    return {
        "r": pick("lora.r"),
        "alpha": pick("lora.lora_alpha"),
        "targets": pick("lora.target_modules"),
    }


def read_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One summary row for a run folder; `status` is `ok`, `failed`, `pruned` (an Optuna
    pruner stopped it: `pruned.json`) or `missing`."""
    overrides_file = run_dir / ".hydra/overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(run=str(run_dir.relative_to(root)) or ".", overrides=" ".join(overrides or []))
    metrics_file, failed_file = run_dir / "metrics.json", run_dir / "failed.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        row.update({k: m[k] for k in COLUMNS if k in m and k not in ("run", "overrides")})
        row.update(
            status=m.get("status", "ok"),
            r=m.get("lora_r"),
            alpha=m.get("lora_alpha"),
            targets=_targets(m.get("target_modules")),
            tokens_per_s=m.get("train_tokens_per_s"),
        )
        return row
    row.update(_from_config(run_dir))
    row["targets"] = _targets(row["targets"])
    if failed_file.is_file():
        row.update(status="failed", error=json.loads(failed_file.read_text()).get("error"))
    elif (run_dir / "pruned.json").is_file():
        row.update(
            status="pruned", error=json.loads((run_dir / "pruned.json").read_text())["reason"]
        )
    else:
        row.update(status="missing", error="no metrics.json or failed.json: unfinished or killed")
    return row


def quality_key(rows: list[dict]) -> tuple[str, bool]:
    """The quality column and whether higher is better (accuracy if every run has it)."""
    ok = [r for r in rows if r["status"] == "ok"]
    if ok and all(r["eval_accuracy_after"] is not None for r in ok):
        return "eval_accuracy_after", True
    return "eval_loss_after", False


def mark_pareto(rows: list[dict]) -> None:
    """Set `pareto` on finished runs: no other run has as few trainable params and better quality.

    A run is Pareto-optimal when no other finished run has `trainable_params` <= its own and
    quality at least as good, with one of the two strictly better. Also sets `best` on the run with
    the best quality overall.
    """
    key, higher = quality_key(rows)
    sign = -1.0 if higher else 1.0  # compare as "lower is better"
    ok = [r for r in rows if r["status"] == "ok" and r[key] is not None and not math.isnan(r[key])]
    finished = {id(r) for r in ok}
    for r in rows:
        r["pareto"] = r["best"] = False if id(r) in finished else None
    for r in ok:
        p, q = r["trainable_params"], sign * r[key]
        r["pareto"] = not any(
            o["trainable_params"] <= p
            and sign * o[key] <= q
            and (o["trainable_params"] < p or sign * o[key] < q)
            for o in ok
        )
    if ok:
        min(ok, key=lambda r: sign * r[key])["best"] = True


def summarize(root: Path) -> list[dict]:
    """Rows for every run folder under `root`, Pareto and best marked.

    Raises:
        ValueError: `root` is not a folder or holds no run folder.
    """
    if not root.is_dir():
        raise ValueError(
            f"{root} is not a folder; give a multirun folder (outputs/multirun/DAY/TIME)."
        )
    runs = find_runs(root)
    if not runs:
        raise ValueError(
            f"No run folders (with .hydra/config.yaml) under {root}; give the folder a "
            "`lorafit train -m` sweep wrote (its `hydra.sweep.dir`)."
        )
    rows = [read_run(d, root) for d in runs]
    study_report.annotate(rows, root)  # an Optuna sweep: why a trial's folder is missing
    mark_pareto(rows)
    add_effective_ranks(rows, root)
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict], root: Path) -> str:
    """summary.md: headline (best run, Pareto runs, failures) and one table row per run."""
    key, higher = quality_key(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    # Overrides every run shares go to the headline; the table shows what varies.
    split = [r["overrides"].split() for r in rows]
    common = set.intersection(*map(set, split)) if split else set()
    rows = [
        {**r, "overrides": " ".join(o for o in s if o not in common)}
        for r, s in zip(rows, split, strict=True)
    ]
    lines = [f"# Sweep report: {root}", ""]
    if common:
        lines += [f"Shared overrides: `{' '.join(o for o in split[0] if o in common)}`", ""]
    lines.append(
        f"{len(rows)} runs: {len(ok)} ok, {sum(r['status'] == 'failed' for r in rows)} failed, "
        + (f"{n} pruned, " if (n := sum(r["status"] == "pruned" for r in rows)) else "")
        + f"{sum(r['status'] == 'missing' for r in rows)} missing. Quality: `{key}` "
        f"({'higher' if higher else 'lower'} is better)."
    )
    best = next((r for r in rows if r["best"]), None)
    if best:
        lines.append(
            f"\n**Best run: {best['run']}** (`{best['overrides'] or 'defaults'}`): {key} "
            f"{best[key]:.4f} with {best['trainable_params']:,} trainable params."
        )
    pareto = [r["run"] for r in rows if r["pareto"]]
    lines.append(
        f"\nPareto-optimal (best {key} for their parameter count): runs {', '.join(pareto)}"
    )
    lines += memory_note(ok)
    long_texts = ("error", "peak_rss_scope")  # summary.md says them outside the table
    cols = [c for c in COLUMNS if c not in long_texts and any(r[c] is not None for r in rows)]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "## Failed, pruned or missing runs", ""]
        lines += [
            f"- run {r['run']} (`{r['overrides']}`): {r['status']}: {r['error']}" for r in bad
        ]
    lines += study_report.markdown(root)  # an Optuna sweep's study: best, importance, plots
    return "\n".join(lines) + "\n"


def memory_note(ok: list[dict]) -> list[str]:
    """summary.md's line on what `peak_rss_mb` measures, and whether the runs compare by it."""
    measured = [r for r in ok if r["peak_rss_mb"] is not None]
    scopes = sorted({str(r["peak_rss_scope"] or "not recorded") for r in measured})
    if not scopes:
        return []
    if len(scopes) == 1:
        return [f"\n`peak_rss_mb`: {scopes[0]} (the same for every run, so they compare)."]
    return [
        "\n**`peak_rss_mb` does not compare across these runs**: measured over different "
        f"scopes ({'; '.join(scopes)})."
    ]


def _label(r: dict) -> str:
    if r["targets"] == "full":
        return "full FT"
    return f"r{r['r']}/a{r['alpha']:g}" if isinstance(r["alpha"], int | float) else f"r{r['r']}"


def plot_tradeoff(rows: list[dict], path: Path):
    """tradeoff.png: quality vs trainable params (log x, Pareto front); quality vs seconds.

    Returns:
        The matplotlib figure (saved and closed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    key, higher = quality_key(rows)
    ok = [r for r in rows if r["status"] == "ok" and r[key] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, xkey, xlabel in [
        (axes[0], "trainable_params", "trainable parameters (log scale)"),
        (axes[1], "train_seconds", "training seconds"),
    ]:
        colors = ["tab:red" if r["pareto"] else "tab:blue" for r in ok]
        ax.scatter([r[xkey] for r in ok], [r[key] for r in ok], c=colors, zorder=3)
        for r in ok:
            ax.annotate(
                _label(r), (r[xkey], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        before = [r[key.replace("_after", "_before")] for r in ok]
        if before and before[0] is not None:
            ax.axhline(before[0], color="gray", ls=":", label="before training")
        ax.set(xlabel=xlabel, ylabel=key)
        ax.grid(alpha=0.3)
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: r["trainable_params"])
    if front:
        axes[0].step(
            [r["trainable_params"] for r in front],
            [r[key] for r in front],
            where="post",
            color="tab:red",
            label="Pareto front",
        )
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(compact_number))  # 184.32k
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    failed = len(rows) - len(ok)
    fig.suptitle(
        f"{len(ok)} runs"
        + (f" ({failed} failed/missing, not drawn)" if failed else "")
        + f"; {key}, {'higher' if higher else 'lower'} is better"
    )
    readable_ticks(fig)  # runs within one decade have no power-of-ten tick to label
    fig.tight_layout()
    write_figure(fig, path)
    return fig


def write_report(root: str | Path) -> list[dict]:
    """Write summary.csv, summary.md and tradeoff.png into `root`. Returns the rows.

    Raises:
        ValueError: `root` holds no run folder.
    """
    root = Path(root)
    rows = summarize(root)
    atomic_write(root / "summary.csv", to_csv(rows))
    atomic_write(root / "summary.md", to_markdown(rows, root) + "\n".join(markdown_section(rows)))
    plot_tradeoff(rows, root / "tradeoff.png")
    study_report.plot(root)  # an Optuna sweep: optuna_history.png, optuna_parallel.png
    plot_forgetting(rows, root / "forgetting.png")  # drawn when runs measured general_loss
    return rows


class ReportCallback(Callback):
    """Hydra callback: write the sweep report into `hydra.sweep.dir` when a multirun ends, and
    end the process with exit status 1 when no run of the sweep finished (each failed run returns
    normally so that the sweep goes on, which Hydra alone would report as success)."""

    root: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolved once, at the start: `${now:...}` in the folder name must not move at the end.
        self.root = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = self.root or Path(config.hydra.sweep.dir)
        try:
            rows = write_report(root)
        except Exception as e:  # the runs are done and saved; a report problem must not hide that
            log.error("Sweep report failed (%s); rebuild it with `lorafit report %s`.", e, root)
        else:
            best = next((r for r in rows if r["best"]), None)
            log.info(
                "Sweep report: %s/summary.md, tradeoff.png (%d runs, best: %s)",
                root,
                len(rows),
                f"run {best['run']} {best['overrides']}" if best else "none finished",
            )
        runs = find_runs(root) if root.is_dir() else []
        if not any((d / "metrics.json").is_file() for d in runs):
            log.error(
                "No run of the sweep finished (%d run folders, none with metrics.json; the errors "
                "are in %s/summary.md and each run's failed.json): exit status 1.",
                len(runs),
                root,
            )
            raise SystemExit(1)  # Hydra's callback runner catches Exception, not SystemExit
