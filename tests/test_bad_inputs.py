"""Every case of the bad-input corpus (`tests/bad_inputs/`, see its README): a clean lorafit error
that names the file, field or key, or a counted skip; never an exception from inside a library."""

import importlib.util
from pathlib import Path

import pytest
import yaml

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*/*/case.yaml"))


def runner(area: str):
    spec = importlib.util.spec_from_file_location(f"bad_inputs_{area}", CORPUS / area / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run


@pytest.mark.parametrize(
    "path", CASES, ids=[f"{p.parent.parent.name}/{p.parent.name}" for p in CASES]
)
def test_bad_input_case(path, tmp_path):
    case = yaml.safe_load(path.read_text())
    assert case["expect"] in ("error", "skip"), path
    text = runner(path.parent.parent.name)(path.parent, case, tmp_path)
    for fragment in case["message"]:
        assert str(fragment) in text, f"{path.parent.name}: {fragment!r} not in {text!r}"


def test_the_corpus_covers_every_area():
    areas = {p.parent.parent.name for p in CASES}
    assert areas >= {"config", "data", "adapters"}, areas
