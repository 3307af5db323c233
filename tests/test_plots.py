"""Every axis of every plot lorafit draws shows numbers a reader can take as they are: at least two
tick labels in view, each one the plain value at its tick (no offset or exponent to add)."""

import csv
import re

import pytest

from lorafit.artifacts import plot_loss_curve
from lorafit.report import plot_tradeoff
from lorafit.tasks.classification import plot_confusion_matrix

SUFFIX = {"k": 1e3, "M": 1e6, "G": 1e9}


def number(text: str) -> float:
    """A tick label as a number: '1,200', '−0.5', '184k', '1.5M'."""
    text = text.replace("\N{MINUS SIGN}", "-").replace(",", "")
    match = re.fullmatch(r"(-?[0-9.]+)([kMG]?)", text)
    assert match, f"tick label {text!r} is not a plain number"
    return float(match.group(1)) * SUFFIX.get(match.group(2), 1)


def labelled_ticks(axis) -> list[tuple[float, str]]:
    """(position, label) of the labelled ticks, major and minor, inside the axis' view."""
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for minor in (False, True):
        locs = axis.get_ticklocs(minor=minor)
        for loc, label in zip(locs, axis.get_ticklabels(minor=minor), strict=True):
            if label.get_text() and lo <= loc <= hi:
                out.append((float(loc), label.get_text()))
    return out


def assert_numbers_readable(axis, name: str) -> None:
    ticks = labelled_ticks(axis)
    assert len(ticks) >= 2, f"{name}: {len(ticks)} labelled tick(s) in view: {ticks}"
    assert not axis.get_offset_text().get_text(), f"{name}: offset {axis.get_offset_text()}"
    for loc, text in ticks:
        assert number(text) == pytest.approx(loc, rel=0.01, abs=1e-9), f"{name}: {text} at {loc}"


def row(r: int, params: int, loss: float, seconds: float) -> dict:
    return {
        "status": "ok",
        "r": r,
        "alpha": 2 * r,
        "targets": "q_proj,v_proj",
        "trainable_params": params,
        "eval_loss_before": 2.5,
        "eval_loss_after": loss,
        "eval_accuracy_after": None,
        "train_seconds": seconds,
        "pareto": True,
        "best": r == 4,
    }


@pytest.mark.parametrize(
    "params",
    [(200, 400), (92_160, 184_320), (61_056, 63_360), (1_000, 1_000_000)],
    ids=["r2-r4", "r2-r4-smollm2", "3pct-apart", "3-decades"],
)
def test_sweep_tradeoff_axes_carry_numbers_for_any_parameter_range(tmp_path, params):
    rows = [row(2, params[0], 2.0, 10.0), row(4, params[1], 1.8, 11.0)]
    fig = plot_tradeoff(rows, tmp_path / "tradeoff.png")
    fig.canvas.draw()
    for i, ax in enumerate(fig.axes):
        assert_numbers_readable(ax.xaxis, f"axes {i} x")
        assert_numbers_readable(ax.yaxis, f"axes {i} y")
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("steps", "losses"),
    [(range(10), [2.345 + 1e-5 * s for s in range(10)]), (range(0, 200_000, 20_000), [1.0] * 10)],
    ids=["nearly-flat-loss", "long-run-flat"],
)
def test_loss_curve_axes_carry_numbers(tmp_path, steps, losses):
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "step", "train/loss", "val/loss"])
        writer.writerows([0, s, loss, ""] for s, loss in zip(steps, losses, strict=True))
    fig = plot_loss_curve(path, tmp_path / "loss_curve.png", "title", "loss")
    fig.canvas.draw()
    assert_numbers_readable(fig.axes[0].xaxis, "step")
    assert_numbers_readable(fig.axes[0].yaxis, "loss")


@pytest.mark.parametrize(
    "confusion", [[[4, 4], [4, 4]], [[0, 0], [0, 0]], [[30, 1, 0], [2, 25, 3], [0, 0, 40]]]
)
def test_confusion_matrix_names_classes_and_counts_from_zero(tmp_path, confusion):
    names = ["business", "sport", "tech"][: len(confusion)]
    fig = plot_confusion_matrix(confusion, names, tmp_path / "cm.png", "test")
    fig.canvas.draw()
    ax, cbar = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    cells = sorted(int(t.get_text()) for t in ax.texts)
    assert cells == sorted(c for line in confusion for c in line)
    assert_numbers_readable(cbar.yaxis, "colorbar")
    counts = [number(text) for _, text in labelled_ticks(cbar.yaxis)]
    assert min(counts) == 0 and all(c == int(c) for c in counts), counts  # whole counts from 0
    assert max(counts) >= max(max(line) for line in confusion)
