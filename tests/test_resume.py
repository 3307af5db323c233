"""Resuming from `checkpoints/last.ckpt` continues the run as if it had never stopped: the same
steps on the same data, bit for bit on CPU."""

import pytest
import torch

from tiny_runs import EXACT, adapter, save_tiny_smol, train_run

pytestmark = pytest.mark.slow


def test_stop_and_resume_equals_an_uninterrupted_run(smol_tokenizer, tmp_path):
    """4 steps, then resumed to 7, against 7 straight. 12 conversations in steps of 2 x 2 are 3
    steps an epoch, so the stop falls inside the second epoch; a checkpoint every 3 steps makes
    Lightning's own last.ckpt one step stale at the stop."""
    tiny = save_tiny_smol(tmp_path / "model", smol_tokenizer)
    common = [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=12",
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=3",
        "trainer.limit_val_batches=1",
        "+callbacks.checkpoint.every_n_train_steps=3",
        "scheduler=constant",  # a schedule's length follows max_steps; a constant rate does not
        *EXACT,
    ]
    straight = train_run(tmp_path / "straight", *common, "trainer.max_steps=7")
    train_run(tmp_path / "first", *common, "trainer.max_steps=4")
    last = tmp_path / "first/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = train_run(tmp_path / "resumed", *common, "trainer.max_steps=7", f"ckpt_path={last}")
    assert resumed["train_steps"] == straight["train_steps"] == 7
    assert resumed["eval_loss_after"] == straight["eval_loss_after"]  # bit for bit
    assert resumed["train_tokens"] == straight["train_tokens"]
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
