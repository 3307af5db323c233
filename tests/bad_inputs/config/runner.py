"""Config cases: compose the `train` config with the case's overrides as `lorafit train` would and
validate it; the error must come there, before any model or data is read.

case.yaml keys (besides kind / expect / message):
    overrides: Hydra overrides, as on the command line.
    argv: instead, a whole `lorafit train` command line (`-m` and sweeps allowed): checked as
        `python -m lorafit.train` checks it before Hydra composes.
    multirun: true to validate as one job of a multirun (hydra.mode=MULTIRUN).
A `conf/` folder beside case.yaml holds the user's own config files (added to Hydra's search path).
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from lorafit.schema import check_override_keys, compose_train
from lorafit.train import validate


def check(case_dir: Path, case: dict, tmp_path: Path) -> None:
    if "argv" in case:
        check_override_keys([str(a) for a in case["argv"]])
        return
    overrides = [str(o) for o in case.get("overrides", [])]
    if (case_dir / "conf").is_dir():
        overrides.insert(0, f"hydra.searchpath=[file://{(case_dir / 'conf').resolve()}]")
    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.override_dirname = "case"
        if case.get("multirun"):
            cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    validate(cfg)


def run(case_dir: Path, case: dict, tmp_path: Path) -> str:
    try:
        check(case_dir, case, tmp_path)
    except ValueError as e:  # lorafit's config errors: one ValueError with the whole message
        assert case["expect"] == "error", f"{case_dir.name}: unexpected error {e}"
        assert not (tmp_path / "run").exists(), "an error after the run folder was made"
        return str(e)
    raise AssertionError(f"{case_dir.name}: the config was accepted")
