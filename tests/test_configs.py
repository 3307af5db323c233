"""Every shipped config option composes, and the cheap objects it describes instantiate."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lorafit.train import CONF_DIR

GROUPS = ["model", "data", "lora", "optimizer", "scheduler", "trainer", "logger", "experiment"]
OPTIONS = [
    (group, path.stem)
    for group in GROUPS
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml"))
]
REQUIRED = {  # options with a mandatory (???) key need a value to resolve
    ("model", "hf"): ["model.name_or_path=/some/folder"],
    ("data", "jsonl_messages"): ["data.path=/some/file.jsonl"],
}


def compose_with(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)  # keeps its own copy of the hydra node
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    cfg = compose_with(tmp_path, overrides)
    for g in ("model", "data", "lora", "optimizer", "trainer", "logger"):
        assert g in cfg, g
    # Resolving every interpolation catches typos in ${...} references.
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["seed"] == cfg.seed


def test_default_objects_instantiate(tmp_path):
    cfg = compose_with(tmp_path, [])
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer)(params)
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup up to the configured lr, then cosine decay to min_lr_ratio x lr
    assert max(lrs) == pytest.approx(cfg.optimizer.lr)
    assert lrs[-1] == pytest.approx(cfg.optimizer.lr * cfg.scheduler.min_lr_ratio, rel=0.05)
    trainer = instantiate(cfg.trainer, logger=instantiate(cfg.logger))
    assert trainer.max_steps == cfg.trainer.max_steps
    assert Path(trainer.logger.log_dir).is_relative_to(tmp_path)


def test_wandb_logger_is_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_with(tmp_path, ["logger=wandb"])
    assert cfg.logger.offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cfg.logger.offline is False  # resolved lazily, at instantiation time
