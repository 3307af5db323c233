"""One optimizer step trains on the mean over all its supervised tokens, however the step is split
into micro-batches: the objective of transformers' `num_items_in_batch`, on the real built-in
conversations."""

import copy
import json
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lorafit.artifacts import read_logged
from lorafit.data.lm import ChatDataModule
from lorafit.lora import LoRAConfig, lora_modules
from lorafit.tasks.causal_lm import CausalLMModule, causal_lm_loss
from tiny_runs import EXACT, adapter, save_tiny_smol, train_run

# Plain SGD at lr 1: the first update is minus the gradient. No clipping, no schedule.
SGD = [
    "optimizer._target_=torch.optim.SGD",
    "optimizer.lr=1.0",
    "~optimizer.betas",
    "scheduler=constant",
    "trainer.gradient_clip_val=null",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> str:
    return str(save_tiny_smol(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer))


@pytest.mark.slow
def test_batch_split_and_accumulation_give_the_same_first_update(tiny_dir, tmp_path):
    """8 x 1, 4 x 2 and 2 x 4 over the same 8 conversations: one objective, one update."""
    runs = {}
    for batch, accumulate in [(8, 1), (4, 2), (2, 4)]:
        run_dir = tmp_path / f"{batch}x{accumulate}"
        train_run(
            run_dir,
            "model=hf",
            f"model.name_or_path={tiny_dir}",
            "data.max_train_examples=8",
            f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "callbacks=none",
            *SGD,
            *EXACT,
        )
        (loss,) = read_logged(next(run_dir.glob("csv/**/metrics.csv")), "train/loss")
        runs[batch, accumulate] = adapter(run_dir), loss[1]
    (ref, ref_loss), *others = runs.values()
    assert max(t.abs().max() for k, t in ref.items() if "lora_B" in k) > 1e-3  # a real update
    for tensors, loss in others:
        assert tensors.keys() == ref.keys()
        assert max((tensors[k] - ref[k]).abs().max() for k in ref) < 1e-6
        assert loss == pytest.approx(ref_loss, abs=1e-6)  # train/loss: the step's token mean


@pytest.fixture
def minilm_without_dropout(tmp_path) -> Path:
    """The built-in MiniLM folder with BERT's own dropout set to 0 (LoRA's is a config key)."""
    from lorafit.config import CONF_DIR
    from lorafit.models import resolve_model_dir

    source = resolve_model_dir(instantiate(OmegaConf.load(f"{CONF_DIR}/model/minilm_l6.yaml")))
    folder = Path(shutil.copytree(source, tmp_path / "minilm"))
    config = json.loads((folder / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_classification_step_is_the_mean_over_its_examples(minilm_without_dropout, tmp_path):
    """MiniLM on 6 BBC News articles: 4 x 2 (micro-batches of 4 and 2) and 2 x 3 take the step of
    6 x 1, the mean over the 6 examples, not a mean of the micro-batches' means."""
    runs = []
    for batch, accumulate in [(6, 1), (4, 2), (2, 3)]:
        run_dir = tmp_path / f"{batch}x{accumulate}"
        train_run(
            run_dir,
            "experiment=minilm_bbc",
            "model=hf",
            f"model.name_or_path={minilm_without_dropout}",
            "data.max_train_examples=6",
            "data.max_length=64",
            f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "callbacks=none",
            *SGD,
            *EXACT,
        )
        runs.append(adapter(run_dir))
    ref, *others = runs
    for tensors in others:
        assert max((tensors[k] - ref[k]).abs().max() for k in ref) < 1e-6


@pytest.mark.slow
def test_step_loss_and_update_match_transformers(smol_dir, smol_tokenizer, tmp_path):
    """Real SmolLM2, a real step of 2 micro-batches: lorafit's loss and gradient are those of
    transformers' `model(..., labels=..., num_items_in_batch=N)` summed over the micro-batches."""
    from transformers import AutoModelForCausalLM

    from lorafit.tasks.causal_lm import supervised_tokens

    dm = ChatDataModule(smol_tokenizer, max_train_examples=8, batch_size=4, num_samples=0)
    dm.accumulate = 2
    dm.setup()
    step = next(iter(dm.train_dataloader()))
    assert isinstance(step, list) and [len(b["labels"]) for b in step] == [4, 4]

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    lora.inject(model)
    torch.manual_seed(0)
    for _, layer in lora_modules(model):  # B = 0 would leave A without a gradient
        nn.init.normal_(layer.lora_B, std=0.02)
    model.train()
    reference = copy.deepcopy(model)

    n = sum(supervised_tokens(b["labels"]) for b in step)
    want = sum(reference(**b, num_items_in_batch=n).loss for b in step)
    want.backward()
    with torch.no_grad():  # one padded batch of all 8: transformers' plain mean, and lorafit's
        whole = dm.train_dataloader().collate_fn(list(dm.train_set))
        out = reference(**whole)
        plain, (ours, count) = out.loss, causal_lm_loss(out.logits, whole["labels"])
    assert count == n and abs(ours - plain) < 1e-5 and abs(plain - want) < 1e-5

    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in trainable.items()}
    module = CausalLMModule(model, optimizer=partial(torch.optim.SGD, lr=1.0))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision=32,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())  # its first step is `step`
    assert abs(float(trainer.callback_metrics["train/loss"]) - float(want)) < 1e-5
    grads = dict(reference.named_parameters())
    # SGD at lr 1: before - after = gradient. lorafit scores only the supervised rows, in chunks
    # (lorafit.tasks.lm_loss): float32 sums in another order through 30 layers, measured up to
    # 1.03e-4 of the largest entry; checked at 3e-4 (a wrong gradient is off by its own size).
    for k, p in trainable.items():
        scale = grads[k].grad.abs().max()
        assert ((before[k] - p.detach()) - grads[k].grad).abs().max() < 3e-4 * scale, k
