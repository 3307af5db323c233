"""`trainer.deterministic` is the one switch for torch's deterministic algorithms, on by default,
and metrics.json records what the run had."""

import pytest
import torch

from tiny_runs import EXACT, compose_run, save_tiny_smol, train_run


@pytest.fixture
def keep_torch_setting():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_default_config_asks_for_deterministic_algorithms(tmp_path):
    assert compose_run(tmp_path, []).trainer.deterministic is True


@pytest.mark.parametrize("deterministic", [True, False])
def test_trainer_deterministic_decides_and_is_recorded(
    smol_tokenizer, tmp_path, keep_torch_setting, deterministic
):
    tiny = save_tiny_smol(tmp_path / "model", smol_tokenizer)
    metrics = train_run(
        tmp_path / "run",
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=4",
        "data.batch_size=2",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
        "callbacks=none",
        f"trainer.deterministic={deterministic}",
        *EXACT,
    )
    assert metrics["deterministic"] is deterministic
    assert torch.are_deterministic_algorithms_enabled() is deterministic
