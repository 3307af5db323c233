"""Every `benchmarks/*.py` script runs: a smoke run (`--tiny`) of each, as `make bench` runs it.

The contract for a benchmark script: `--tiny` runs the same code paths on a tiny random model with
minimal iterations, prints its results and writes no file unless told where (`--out`). A script
added later is picked up by the glob; list the lines its output must hold in `EXPECTED`.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH_DIR.glob("*.py"))
NUM = r"[-+0-9.e]+"  # a formatted float: 794.7, 1.005, 3.87e-07
# Per script: regexes that must each match one whole line of its `--tiny` output.
EXPECTED = {
    "bench_merge.py": [
        r"# Benchmark: zero-latency merge .*",
        rf"\| forward, batch \d+ x \d+ tokens \(\d+ rounds\) \|( {NUM} \|){{5}}",
        rf"\| greedy generation, \d+ new tokens \(\d+ rounds\) \|( {NUM} \|){{5}}",
        rf"Merged vs unmerged logits .*: max abs diff (?P<merge_diff>{NUM}), top-1 agreement "
        rf"{NUM}%\.",
        rf"\| bfloat16 \| {NUM} \| {NUM} \| {NUM}% \| 4 \|",
        rf"\| float16 \| {NUM} \| {NUM} \| {NUM}% \| 1 \|",
    ],
    "train_throughput.py": [
        r"# Benchmark: training throughput, lorafit vs transformers \+ PEFT .*",
        rf"\| baseline \|( {NUM} \|){{5}} {NUM}% \|",
        rf"\| lorafit \|( {NUM} \|){{5}} {NUM}% \|",
        rf"Ratio lorafit / baseline \(non-padding tokens/s\): {NUM}\. .*",
        rf'\{{"lorafit_tokens_per_s": {NUM}, "baseline_tokens_per_s": {NUM}, "ratio": {NUM}, '
        rf'"mfu": {NUM}, .*"lorafit_loss": {NUM}, "baseline_loss": {NUM}, .*\}}',
    ],
}


def tracked_state() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in BENCH_DIR.iterdir() if p.is_file()}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_smoke_run(script: Path, smol_dir):  # smol_dir: the built-in converted once
    patterns = EXPECTED.get(script.name)
    if patterns is None:
        pytest.fail(f"{script.name}: list the lines its --tiny output must hold in EXPECTED here")
    before = tracked_state()
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script.name} --tiny failed:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.splitlines()
    found = {}
    for pattern in patterns:
        match = next((m for line in lines if (m := re.fullmatch(pattern, line))), None)
        assert match, f"{script.name}: no output line matches {pattern!r}:\n{proc.stdout}"
        found.update(match.groupdict())
    assert tracked_state() == before, f"{script.name} --tiny changed files in benchmarks/"
    if "merge_diff" in found:  # the merged model computes what the unmerged one does
        assert float(found["merge_diff"]) < 1e-4


def test_expected_lists_only_existing_scripts():
    assert set(EXPECTED) <= {p.name for p in SCRIPTS}
