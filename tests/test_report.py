"""Sweep report on synthetic run folders: aggregation, Pareto marking, failed and missing runs."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main as cli
from lorafit.report import mark_pareto, summarize, write_report
from lorafit.reproduce import compare

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_run(
    root: Path, name: str, r: int, metrics: dict | None = None, error: str | None = None
) -> Path:
    """A run folder as `lorafit train -m` writes it: .hydra/, then metrics.json or failed.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    overrides = [f"lora.r={r}", "trainer.max_steps=3"]
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"lora": {"r": r, "lora_alpha": 2 * r, "target_modules": ATTN}, "seed": 42}
    (run / ".hydra/config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        full = {
            "lora_r": r,
            "lora_alpha": 2 * r,
            "target_modules": ATTN,
            "eval_loss_before": 2.5,
            "train_tokens_per_s": 100.0,
            "adapter_bytes": 4 * metrics["trainable_params"] + 500,
            "status": "ok",
            **metrics,
        }
        (run / "metrics.json").write_text(json.dumps(full))
    if error is not None:
        (run / "failed.json").write_text(json.dumps({"status": "failed", "error": error}))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    """5 runs: r=2 and r=4 on the Pareto front, r=8 dominated by r=4, r=0 failed, r=16 killed."""
    m = lambda p, loss, s: {"trainable_params": p, "eval_loss_after": loss, "train_seconds": s}  # noqa: E731
    make_run(tmp_path, "0", 2, m(100, 2.0, 10.0))
    make_run(tmp_path, "1", 4, m(200, 1.8, 11.0))
    make_run(tmp_path, "2", 8, m(400, 1.9, 12.0))
    make_run(tmp_path, "3", 0, error="ValueError: lora.r must be an integer >= 1, got 0.")
    make_run(tmp_path, "4", 16)  # neither metrics.json nor failed.json
    # `lorafit reproduce` reruns inside a run folder: not a run of this sweep.
    make_run(tmp_path / "1", "reproduce", 4, m(200, 1.8, 11.0))
    make_run(tmp_path, "10", 32, m(800, 1.85, 20.0))  # job 10 sorts after job 4, not after 1
    return tmp_path


def test_rows_status_pareto_and_best(sweep):
    rows = summarize(sweep)
    assert [r["run"] for r in rows] == ["0", "1", "2", "3", "4", "10"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "missing", "ok"]
    assert [r["pareto"] for r in rows] == [True, True, False, None, None, False]
    assert [r["best"] for r in rows] == [False, True, False, None, None, False]
    assert rows[3]["error"].startswith("ValueError: lora.r") and rows[3]["r"] == 0
    assert rows[4]["r"] == 16 and "unfinished" in rows[4]["error"]
    assert rows[1]["alpha"] == 8 and rows[1]["targets"] == ",".join(ATTN)
    assert rows[1]["tokens_per_s"] == 100.0 and rows[1]["adapter_bytes"] == 1300


def test_report_files(sweep):
    write_report(sweep)
    with open(sweep / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 6
    assert table[1]["eval_loss_after"] == "1.8" and table[1]["pareto"] == "True"
    assert table[3]["status"] == "failed" and "lora.r must be" in table[3]["error"]
    md = (sweep / "summary.md").read_text()
    assert "**Best run: 1** (`lora.r=4`)" in md
    assert "Shared overrides: `trainer.max_steps=3`" in md
    assert "runs 0, 1" in md  # the Pareto line
    assert "- run 3 (`lora.r=0`): failed: ValueError: lora.r must be" in md
    assert "- run 4 (`lora.r=16`): missing" in md
    png = (sweep / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_pareto_ties_and_accuracy():
    def row(p, loss=None, acc=None):
        return {
            "status": "ok",
            "trainable_params": p,
            "eval_loss_after": loss,
            "eval_accuracy_after": acc,
        }

    rows = [row(100, 2.0), row(100, 1.9), row(50, 2.0)]  # same params: the lower loss wins
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [False, True, True]
    rows = [row(100, 9.0, 0.8), row(200, 1.0, 0.7), row(300, 1.0, 0.9)]  # accuracy decides
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, False, True]
    assert [r["best"] for r in rows] == [False, False, True]


def test_cli_report(sweep, tmp_path, capsys):
    assert cli(["report", str(sweep)]) == 0
    assert "Best run: 1" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["report", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "lorafit: error: No run folders" in err and "hydra.sweep.dir" in err
    assert not (empty / "summary.md").exists()


def test_compare_metrics():
    old = {"eval_loss_after": 1.2345678, "data_fingerprint": "ab", "torch_threads": 2}
    ok, table = compare(old, dict(old))
    assert ok and "NO" not in table
    ok, table = compare(old, {**old, "eval_loss_after": 1.2345679, "torch_threads": 1})
    assert not ok and "NO" in table and "differs: torch_threads: 2 -> 1" in table


def test_summary_says_what_peak_rss_measures_and_when_runs_do_not_compare(tmp_path):
    def m(params, scope=None):
        out = {"trainable_params": params, "eval_loss_after": 2.0, "train_seconds": 1.0}
        return {**out, "peak_rss_mb": 900.0, **({"peak_rss_scope": scope} if scope else {})}

    make_run(tmp_path, "0", 2, m(100, "process peak since model load"))
    make_run(tmp_path, "1", 4, m(200, "process peak since model load"))
    write_report(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "`peak_rss_mb`: process peak since model load (the same for every run" in md
    with open(tmp_path / "summary.csv") as fh:
        assert next(csv.DictReader(fh))["peak_rss_scope"] == "process peak since model load"
    make_run(tmp_path, "2", 8, m(400))  # an older run folder: no scope recorded
    write_report(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "**`peak_rss_mb` does not compare across these runs**" in md and "not recorded" in md
