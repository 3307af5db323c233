"""`lorafit.schema`: config values judged by the annotations of the objects they build, ranges
that name real keys, and override typos answered with the closest key. (The bad-input corpus,
`tests/bad_inputs/config/`, runs the same checks through `validate` case by case.)"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from hydra.utils import get_object

from lorafit.config import CONF_DIR, TRAINER_EXTRA_KEYS, accepted_keys
from lorafit.lora import LoRAConfig
from lorafit.models import ModelConfig
from lorafit.schema import (
    RANGES,
    TYPES,
    Range,
    check_override_keys,
    check_values,
    describe,
    fits,
)


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        (8, int, True),
        (8.0, int, False),  # lora.r=8.0: a rank is a whole number
        (True, int, False),  # YAML `true` is not a count
        (8, float, True),  # lr: 1 is a float learning rate
        ("8", float, False),
        (None, int | None, True),
        (None, int, False),
        ("bf16-mixed", Literal["bf16-mixed", 32] | None, True),
        ("32", Literal["bf16-mixed", 32], False),  # the string is not the int 32
        (["q_proj", "v_proj"], str | Sequence[str], True),
        (["q_proj", 3], str | Sequence[str], False),
        ([0.9, 0.999], tuple[float | torch.Tensor, float | torch.Tensor], True),
        ([0.9], tuple[float, float], False),
        ({"v_proj": 16}, dict[str, int] | None, True),
        ({"v_proj": "x"}, dict[str, int], False),
        ("auto", torch.Tensor, None),  # a class no config value can be: not judged
        ("auto", str | torch.nn.Module, True),
        (3, Any, None),
    ],
)
def test_fits_judges_plain_config_values(value, tp, expected):
    assert fits(value, tp) is expected


def test_describe_speaks_config():
    assert describe(int | None) == "int or null"
    assert describe(float | torch.Tensor) == "float"  # a Tensor is no config value
    assert describe(Literal[32, 16] | Literal["bf16"] | None) == "one of 32, 16, 'bf16' or null"
    assert describe(tuple[float, float]) == "a list of 2 (float, float)"
    assert describe(bool) == "bool (true or false)"


@pytest.mark.parametrize(
    ("limits", "inside", "outside", "text"),
    [
        (Range(ge=0, lt=1), [0, 0.5], [1, -0.1, 1.5], "in [0, 1)"),
        (Range(gt=0, lt=1), [0.1], [0, 1], "in (0, 1)"),
        (Range(ge=1, also=(-1,)), [-1, 1, 10], [0, -2], "-1 or >= 1"),
        (Range(gt=0), [1e-9], [0, -1], "> 0"),
    ],
)
def test_range_bounds_and_words(limits, inside, outside, text):
    assert all(v in limits for v in inside) and not any(v in limits for v in outside)
    assert str(limits) == text


def group_keys() -> dict[str, set[str]]:
    """Keys each group's shipped options set or their objects take, and the top-level ones."""
    keys = {"": set(yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text()))}
    keys["samples"] = {"num_prompts", "max_new_tokens"}
    keys["trainer"] = set(TRAINER_EXTRA_KEYS)
    for group in ("model", "data", "lora", "optimizer", "scheduler", "trainer", "task"):
        for path in (Path(CONF_DIR) / group).glob("*.yaml"):
            node = yaml.safe_load(path.read_text()) or {}
            built = {"model": ModelConfig, "lora": LoRAConfig}.get(group)
            target = get_object(node["_target_"]) if "_target_" in node else built
            keys.setdefault(group, set()).update(node, accepted_keys(target) or [])
    return keys


def test_every_range_and_type_names_a_real_key():
    keys = group_keys()
    for key in {*RANGES, *TYPES}:
        group, _, name = key.rpartition(".")
        assert name in keys[group], f"{key}: no shipped config or object has it"


def test_values_are_judged_where_they_came_from():
    resolved = {
        "seed": 1,
        "lora": {"_target_": "lorafit.lora.LoRAConfig", "r": 4, "lora_dropout": 1.0},
        "data": {"_target_": "lorafit.data.lm.ChatDataModule", "batch_size": "8"},
    }
    with pytest.raises(ValueError) as info:
        check_values(resolved, {"lora": "mine"}, {}, ["data.batch_size='8'"])
    msg = str(info.value)
    assert "lora.lora_dropout=1.0 (set by lora=mine): expected float, in [0, 1)" in msg
    assert "data.batch_size='8' (given as `data.batch_size='8'`): expected int, >= 1" in msg
    assert "lora.r" not in msg and "seed" not in msg
    resolved["lora"]["lora_dropout"], resolved["data"]["batch_size"] = 0.0, 8
    check_values(resolved, {}, {}, [])  # good values pass


def test_a_user_lora_file_without_target_is_judged_by_lora_config():
    resolved = {"lora": {"r": 4, "lora_alpha": -1}}
    with pytest.raises(ValueError, match=r"lora.lora_alpha=-1 .*expected float or null, > 0"):
        check_values(resolved, {}, {"lora": LoRAConfig}, [])


@pytest.mark.parametrize(
    "argv",
    [
        [],  # nothing to check: no composition at all
        ["lora=dora", "-m", "data=conversations,text"],  # group choices only: nothing either
        ["seed=3", "threads=1"],
        ["-m", "lora.r=4,8,16", "lora.lora_alpha=16"],
        ["-m", "lora=default,dora", "lora.use_dora=true"],
        ["-m", "optimizer.lr=interval(1e-4,1e-2)", "lora.r=4"],  # an Optuna range: not reducible
        ["+trainer.fast_dev_run=1", "lora.r=4"],
        ["--cfg", "job", "lora.r=4"],
    ],
)
def test_good_command_lines_pass_the_override_check(argv):
    check_override_keys(argv)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["lora.rnak=8"], ["lora.rnak is not a config key (did you mean lora.r?)"]),
        (["sed=1"], ["sed is not a config key (did you mean seed?)", "top level: seed,"]),
        (["-m", "lora.r=4,8", "data.max_lenght=64"], ["did you mean data.max_length?"]),
        (
            ["trainer.fast_dev_run=1"],
            [
                "trainer.fast_dev_run is not in the config file, though lightning.Trainer takes it",
                "write +trainer.fast_dev_run=1",
            ],
        ),  # fmt: skip
        (
            ["lora.rnak=8", "optimizer.lrr=1"],
            ["did you mean lora.r?", "did you mean optimizer.lr?"],
        ),
    ],
)
def test_an_override_of_a_missing_key_names_the_closest(argv, needles):
    with pytest.raises(ValueError) as info:
        check_override_keys(argv)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
