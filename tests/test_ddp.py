"""Two CPU processes under DDP (gloo) take the same optimizer step as one process: each device's
loss is divided by the whole step's supervised tokens and scaled by the world size."""

import pytest

from test_train import lorafit_train
from tiny_runs import EXACT, adapter, save_tiny_smol

pytestmark = pytest.mark.slow


def test_two_processes_give_the_update_of_one(smol_tokenizer, tmp_path):
    tiny = save_tiny_smol(tmp_path / "model", smol_tokenizer)
    common = [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=8",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        "callbacks=none",
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=1.0",
        "~optimizer.betas",
        "scheduler=constant",
        "trainer.gradient_clip_val=null",
        *EXACT,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = lorafit_train(one, *common, "data.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = lorafit_train(
        two,
        *common,
        "data.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter(one), adapter(two)
    assert max(t.abs().max() for k, t in a.items() if "lora_B" in k) > 1e-3
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-6
