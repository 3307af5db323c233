"""The analysis part of a sweep report (`lorafit report`, :mod:`lorafit.report`): each run's
effective rank, and what each run cost the base on text outside its task (forgetting).

Works on the report's rows (dicts with `run`, `status`, `r`, `eval_loss_after`,
`general_loss_before`, `general_loss_after`, ...), so it needs nothing from the report module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.runinfo import readable_ticks, write_figure


def add_effective_ranks(rows: list[dict[str, Any]], root: Path, energy: float = 0.9) -> None:
    """Set each finished row's `effective_rank` (see :func:`lorafit.analyze.effective_rank`):
    from the run's analysis.json, else from its adapter; None without one (full fine-tuning)."""
    from lorafit.analyze import effective_rank

    for row in rows:
        if row["status"] == "ok":
            row["effective_rank"] = effective_rank(root / row["run"], energy)


def general_increase(row: dict[str, Any]) -> float | None:
    """`general_loss_after - general_loss_before`, or None when the run did not measure it."""
    before, after = row.get("general_loss_before"), row.get("general_loss_after")
    return None if before is None or after is None else after - before


def markdown_section(rows: list[dict[str, Any]]) -> list[str]:
    """summary.md's `## Analysis` lines: effective rank against r, and forgetting. Empty when no
    finished run has either."""
    ok = [r for r in rows if r["status"] == "ok"]
    ranked = [r for r in ok if r.get("effective_rank") is not None]
    forgot = [r for r in ok if general_increase(r) is not None]
    if not ranked and not forgot:
        return []
    lines = ["", "## Analysis", ""]
    if ranked:
        below = [r for r in ranked if isinstance(r["r"], int) and r["effective_rank"] < r["r"]]
        lines.append(
            "`effective_rank`: median over layers of the singular directions of ΔW holding 90 % "
            f"of its energy (`lorafit analyze RUN` for the per-layer detail). In {len(below)} of "
            f"{len(ranked)} runs it is below r: there the update used fewer directions than it "
            "was given."
        )
    if forgot:
        worst = max(forgot, key=general_increase)
        lines += [
            "",
            "`general_loss_before/after`: loss on text outside the task (`eval.general_text`); "
            f"an increase is forgetting. Largest increase: run {worst['run']} "
            f"(+{general_increase(worst):.4f}); `forgetting.png` plots it against eval loss.",
        ]
    lines += ["", "| run | r | effective_rank | eval_loss_after | general_loss_increase |"]
    lines.append("|---|---|---|---|---|")
    for r in ok:
        inc, rank, loss = general_increase(r), r.get("effective_rank"), r["eval_loss_after"]
        cells = [
            r["run"],
            "" if r["r"] is None else str(r["r"]),
            "" if rank is None else f"{rank:g}",
            "" if loss is None else f"{loss:.4f}",
            "" if inc is None else f"{inc:+.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_forgetting(rows: list[dict[str, Any]], path: Path):
    """forgetting.png: eval loss after training against the general-loss increase, one point per
    finished run that measured both (lower left: learned the task, kept the rest).

    Returns:
        The figure (saved and closed), or None (nothing drawn) when no run measured it.
    """
    points = [
        r
        for r in rows
        if r["status"] == "ok" and general_increase(r) is not None and r["eval_loss_after"]
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs, ys = [general_increase(r) for r in points], [r["eval_loss_after"] for r in points]
    ax.scatter(xs, ys, zorder=3)
    for r, x, y in zip(points, xs, ys, strict=True):
        label = f"r{r['r']}" if r.get("r") is not None else r["run"]
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0, color="gray", ls=":", label="general loss unchanged")
    ax.set(
        xlabel="general loss increase (after - before, nats/token): forgetting",
        ylabel="eval_loss_after",
        title=f"Task loss vs forgetting ({len(points)} runs)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    readable_ticks(fig)
    fig.tight_layout()
    write_figure(fig, path)
    return fig
