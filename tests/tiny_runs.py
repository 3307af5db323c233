"""In-process `lorafit.train` runs on a tiny random Llama that reads SmolLM2's real tokenizer, so
whole runs on the real built-in conversations take seconds (`model=hf model.name_or_path=...`)."""

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.config import CONF_DIR

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# Float32 throughout and no dropout: runs that should agree can be compared to the last bit.
EXACT = ["trainer.precision=32", "lora.lora_dropout=0", "samples.num_prompts=0"]


def save_tiny_smol(path: Path, tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved with the real tokenizer at `path`."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def compose_run(run_dir: Path, overrides: list[str]):
    """The composed `train` config with Hydra's runtime set as `lorafit train` would have it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.override_dirname = "test"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def train_run(run_dir: Path, *overrides: str) -> dict:
    """`lorafit.train.train` in this process; returns metrics.json's content."""
    from lorafit.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    train(compose_run(run_dir, list(overrides)))
    return json.loads((run_dir / "metrics.json").read_text())


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter/adapter_model.safetensors")


class SignalAt:
    """Test callback (`+callbacks.kill._target_=tiny_runs.SignalAt +callbacks.kill.step=K
    +callbacks.kill.signum=N`): send signal N to this process (`group`: to its whole process group,
    every DDP rank) in the middle of optimizer step K+1 (at its backward pass), in a run that did
    not start from a checkpoint."""

    def __new__(cls, step: int, signum: int, group: bool = False):
        import os

        import lightning as L

        class _SignalAt(L.Callback):
            def on_before_backward(self, trainer, pl_module, loss):
                if trainer.global_step == step and trainer.ckpt_path is None:
                    if group:
                        os.killpg(os.getpgrp(), signum)
                    elif trainer.is_global_zero:
                        os.kill(os.getpid(), signum)

        return _SignalAt()
