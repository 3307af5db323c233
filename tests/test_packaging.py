"""The wheel works without the checkout: built, installed into a fresh venv, run from elsewhere.

The fresh venv reuses this venv's installed dependencies through a `.pth` line (nothing is
downloaded). A plain path line appends that folder to `sys.path` without processing the `.pth`
files inside it, so the editable install's link to `src/` stays invisible and `import lorafit`
must come from the wheel.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(args: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> str:
    """Run a command, fail the test with its output if it exits non-zero; return its stdout."""
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """The wheel installed (no deps) into a new venv that sees this venv's site-packages."""
    tmp = tmp_path_factory.mktemp("packaging")
    dist = tmp / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, "-w", dist, "."], cwd=ROOT)
    (wheel,) = dist.glob("lorafit-*.whl")

    prefix = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", prefix], cwd=tmp)
    python = prefix / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(run([python, "-c", purelib], cwd=tmp).strip())
    (site / "lorafit_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # pip comes from this venv through the .pth; --ignore-installed: never touch the editable
    # lorafit it can also see.
    pip_install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    run([*pip_install, wheel], cwd=tmp)

    work = tmp / "work"  # a cwd outside the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LORAFIT_OUTPUTS"] = str(tmp / "outputs")  # HOME stays: the converted model is cached there
    return {
        "tmp": tmp,
        "site": site,
        "python": python,
        "lorafit": prefix / "bin" / "lorafit",
        "work": work,
        "env": env,
    }


def test_installed_package_comes_from_the_wheel(venv):
    where = run(
        [
            venv["python"],
            "-c",
            "import json, lorafit, lorafit.config as c; "
            "print(json.dumps([lorafit.__file__, c.CONF_DIR, c.SWEEPS_DIR]))",
        ],
        venv["work"],
        venv["env"],
    )
    module, conf, sweeps = json.loads(where)
    package = venv["site"] / "lorafit"
    assert Path(module) == package / "__init__.py"
    assert Path(conf) == package / "conf" and (package / "conf" / "train.yaml").is_file()
    assert Path(sweeps) == package / "sweeps" and (package / "sweeps" / "rank_grid.yaml").is_file()


def test_installed_configs_and_sweeps_compose(venv):
    lorafit, work, env = venv["lorafit"], venv["work"], venv["env"]
    cfg = yaml.safe_load(run([lorafit, "train", "--cfg", "job"], work, env))
    assert cfg["model"]["name"] == "smollm2_135m" and cfg["samples"]["num_prompts"] > 0

    sweep = yaml.safe_load(run([lorafit, "train", "+sweep=rank_grid", "--cfg", "job"], work, env))
    assert sweep["lora"]["lora_alpha"] == "${lorafit.mul:2,${lora.r}}"
    assert sweep["samples"]["num_prompts"] == 0

    # the sweep file's `defaults: [override /hydra/sweeper: lorafit_optuna]` applies from the
    # ConfigStore, which the wheel's hydra_plugins/lorafit_optuna_sweeper fills
    hydra = yaml.safe_load(run([lorafit, "train", "+sweep=optuna", "--cfg", "hydra"], work, env))
    sweeper = "hydra_plugins.lorafit_optuna_sweeper.sweeper.LorafitOptunaSweeper"
    assert hydra["hydra"]["sweeper"]["_target_"] == sweeper
    assert hydra["hydra"]["sweeper"]["pruner"]["_target_"] == "optuna.pruners.MedianPruner"
    assert (venv["site"] / "hydra_plugins/lorafit_optuna_sweeper/sweeper.py").is_file()
    assert hydra["hydra"]["sweeper"]["params"]["lora.r"] == "choice(2, 4, 8, 16, 32)"

    groups = run([lorafit, "train", "--help"], work, env)
    assert any(line.startswith("sweep:") and "rank_grid" in line for line in groups.splitlines()), (
        groups
    )


def test_installed_train_then_merge(venv):
    lorafit, work, env, tmp = venv["lorafit"], venv["work"], venv["env"], venv["tmp"]
    overrides = [
        "trainer.max_steps=2",
        "trainer.limit_val_batches=2",
        "data.max_train_examples=16",
        "samples.num_prompts=1",
        "eval.general_docs=8",
    ]
    run([lorafit, "train", *overrides], work, env, timeout=900)
    (metrics,) = (tmp / "outputs").glob("*/*/metrics.json")
    run_dir = metrics.parent
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads(metrics.read_text())["lora_r"] == 8

    merged = tmp / "merged"
    run([lorafit, "merge", run_dir, "--out", merged], work, env, timeout=600)
    assert (merged / "config.json").is_file()
    assert list(merged.glob("*.safetensors"))
