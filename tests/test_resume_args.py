"""`lorafit train resume=RUN_DIR` -> the command that continues the run (no training here)."""

import pytest
import yaml

from lorafit.reproduce import resume_argv


def stopped_run(tmp_path, overrides):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints/last.ckpt").write_bytes(b"")
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run


def test_resume_continues_with_the_runs_first_overrides(tmp_path):
    run = stopped_run(tmp_path, ["lora.r=8", "trainer.max_steps=300"])
    (run / "csv").mkdir()
    (run / "csv/metrics.csv").write_text("step,train/loss\n")
    argv = resume_argv([f"resume={run}", "trainer.max_steps=400"])
    assert argv == [
        "lora.r=8",
        "trainer.max_steps=400",  # given with resume=: wins over the saved value
        f"ckpt_path={run}/checkpoints/last.ckpt",
        f"hydra.run.dir={run}",
    ]
    assert (run / "csv/metrics.part1.csv").is_file() and not (run / "csv/metrics.csv").exists()
    # A resume that failed (lora.r=16 does not fit the checkpoint) had Hydra rewrite
    # overrides.yaml; the next plain resume still uses the run's own overrides.
    (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump(["lora.r=16", "ckpt_path=x"]))
    assert resume_argv([f"resume={run}"])[:2] == ["lora.r=8", "trainer.max_steps=300"]


def test_resume_refuses_folders_it_cannot_continue(tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        resume_argv([f"resume={tmp_path}"])
    run = stopped_run(tmp_path, [])
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="finished"):
        resume_argv([f"resume={run}"])
    (run / "metrics.json").unlink()
    (run / "checkpoints/last.ckpt").unlink()
    with pytest.raises(ValueError, match="no checkpoints/last.ckpt"):
        resume_argv([f"resume={run}"])
    assert resume_argv(["lora.r=4"]) == ["lora.r=4"]  # no resume=: unchanged
