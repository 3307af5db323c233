"""Every shipped option of every config group composes, resolves and builds its object; every sweep
preset composes; a required value left unset is a named error before any heavy work."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from conftest import TINY_BERT, TINY_LLAMA
from lorafit.config import CONF_DIR, SWEEPS_DIR
from lorafit.lora import LoRAConfig, lora_modules, param_groups
from lorafit.models import ModelConfig
from lorafit.tasks.base import LoRAModule
from lorafit.train import make_trainer, validate

GROUPS = [
    "task",
    "model",
    "data",
    "lora",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "debug",
]
OPTIONS = [
    (group, path.stem)
    for group in GROUPS
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml"))
]
SWEEPS = sorted(p.stem for p in Path(SWEEPS_DIR).glob("*.yaml"))
REQUIRED = {  # options with a mandatory (???) key need a value to resolve
    ("model", "hf"): ["model.name_or_path=/some/folder"],
    ("data", "file"): ["data.path=/some/file.jsonl"],
    ("data", "jsonl_messages"): ["data.path=/some/file.jsonl"],
    ("data", "text"): ["data.path=/some/file.txt"],
}
CLASSIFICATION_DATA = {"bbc_news", "csv_classification"}


def compose_with(tmp_path, overrides, multirun: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.override_dirname = "test"
        if multirun:
            cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)  # keeps its own copy of the hydra node
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def overrides_for(group: str, option: str) -> list[str]:
    out = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    if group == "data" and option in CLASSIFICATION_DATA:
        out.append("task=classification")
    if group == "task" and option == "classification":
        out.append("data=bbc_news")
    if (group, option) in (("lora", "bert"), ("model", "minilm_l6")):  # BERT names and heads
        out.append("experiment=minilm_bbc")
    if group == "data" and option == "csv_classification":
        out.append("data.path=/some/file.csv")
    return out


def tiny_model(bert: bool, classifier: bool):
    """A tiny random BERT (the minilm_l6 architecture) or Llama, as a classifier or causal LM."""
    torch.manual_seed(0)
    if bert:
        return BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3))
    config = LlamaConfig(**TINY_LLAMA, num_labels=3)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    cfg = compose_with(tmp_path, overrides_for(group, option))
    # Resolving every interpolation catches typos in ${...} references.
    assert OmegaConf.to_container(cfg, resolve=True)["seed"] == cfg.seed
    task = validate(cfg)  # task and data fit together; nothing required is missing
    assert issubclass(task, LoRAModule)

    model_cfg = instantiate(cfg.model, _convert_="all")
    assert isinstance(model_cfg, ModelConfig) and model_cfg.name == cfg.model.name
    data_cls = get_class(cfg.data._target_)
    datamodule = instantiate(cfg.data, tokenizer=None, seed=cfg.seed)  # reads nothing yet
    assert isinstance(datamodule, data_cls) and data_cls.task == task.name

    lora = instantiate(cfg.lora, _convert_="all")
    assert isinstance(lora, LoRAConfig)
    model = tiny_model(cfg.model.name == "minilm_l6", task.name == "classification")
    if lora.full_finetune:
        assert cfg.lora.r is None
    else:
        report = lora.inject(model)
        assert report.trainable_params > 0 and next(lora_modules(model), None) is not None

    params = param_groups(model)  # as the task module's configure_optimizers passes them
    optimizer = instantiate(cfg.optimizer)(params)
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=20)
    module = instantiate(cfg.task)(model=model, optimizer=instantiate(cfg.optimizer))
    assert isinstance(module, task)
    for _ in range(20):
        optimizer.step()
        scheduler.step()

    if cfg.trainer.accelerator == "gpu":  # fsdp, deepspeed_*: GPU presets, composed and checked
        check_gpu_strategy(cfg.trainer.strategy, model)
        return
    trainer = make_trainer(cfg, model)  # every logger and callback of the composed config
    assert len(trainer.loggers) == len(cfg.logger or {})
    for node in (cfg.callbacks or {}).values():
        assert any(type(c).__name__ == node._target_.rsplit(".", 1)[-1] for c in trainer.callbacks)
    for logger in trainer.loggers if not trainer.fast_dev_run else []:  # fast_dev_run: no files
        assert Path(logger.save_dir).is_relative_to(tmp_path)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes(tmp_path, sweep):
    overrides = [f"+sweep={sweep}"]
    if sweep == "minilm_bbc":
        overrides.insert(0, "experiment=minilm_bbc")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper.params, f"sweep={sweep} sweeps nothing"
    with open_dict(cfg):
        del cfg.hydra
    OmegaConf.to_container(cfg, resolve=True)


def test_default_schedule_warms_up_then_decays_to_its_floor(tmp_path):
    cfg = compose_with(tmp_path, [])
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(cfg.optimizer.lr)
    assert lrs[-1] == pytest.approx(cfg.optimizer.lr * cfg.scheduler.min_lr_rate, rel=0.05)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data=file"], "data.path"),
        (["data=text"], "data.path"),
        (["model=hf"], "model.name_or_path"),
    ],
)
def test_a_required_value_left_unset_is_a_named_error(tmp_path, overrides, key):
    cfg = compose_with(tmp_path, overrides)
    with pytest.raises(ValueError, match=rf"not set: {key}\b"):
        validate(cfg)


def test_task_and_data_that_do_not_fit_are_refused_early(tmp_path):
    cfg = compose_with(tmp_path, ["task=classification"])  # data stays conversations
    with pytest.raises(ValueError, match="task=classification does not fit data=conversations"):
        validate(cfg)
    cfg = compose_with(tmp_path, ["data=bbc_news"])
    with pytest.raises(ValueError, match="data=bbc_news"):
        validate(cfg)


def test_wandb_logger_is_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_with(tmp_path, ["logger=wandb"])
    assert cfg.logger.wandb.offline is True and "csv" in cfg.logger  # the loss curve's source
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cfg.logger.wandb.offline is False  # resolved lazily, at instantiation time


# -- config nodes that are not what the code expects: named errors, no silent defaults ------------


def user_conf(tmp_path, files: dict[str, str]) -> str:
    """A user's own config folder (added with hydra.searchpath); returns the override for it."""
    (tmp_path / "user_conf").mkdir(exist_ok=True)
    for name, text in files.items():
        path = tmp_path / "user_conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return f"hydra.searchpath=[file://{tmp_path / 'user_conf'}]"


def test_lora_config_defaults_are_the_shipped_default_lora():
    from lorafit.config import group_object

    shipped = OmegaConf.load(Path(CONF_DIR) / "lora/default.yaml")
    assert group_object(LoRAConfig, shipped, "lora") == LoRAConfig()
    assert instantiate(shipped, _convert_="all") == LoRAConfig()


@pytest.mark.parametrize(("option", "r", "alpha"), [("small", 4, 16), ("large", 16, 32)])
def test_a_partial_user_lora_file_fills_the_rest_from_the_defaults(tmp_path, option, r, alpha):
    from lorafit.config import group_object

    searchpath = user_conf(
        tmp_path, {"lora/small.yaml": "r: 4\n", "lora/large.yaml": "r: 16\nlora_alpha: 32\n"}
    )
    cfg = compose_with(tmp_path, [searchpath, f"lora={option}"])
    validate(cfg)
    lora = group_object(LoRAConfig, cfg.lora, "lora")  # what build() injects
    assert lora == LoRAConfig(r=r, lora_alpha=alpha)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    report = lora.inject(tiny_model(bert=False, classifier=False))
    assert len(report.modules) == 2 * 4  # 2 layers x q, k, v, o


@pytest.mark.parametrize(
    ("files", "overrides", "needles"),
    [
        ({"lora/typo.yaml": "rnak: 4\n"}, ["lora=typo"], ["lora.rnak", "lora.r?", "lora=typo"]),
        ({}, ["lora.lora_alpha=8", "+lora.lora_aplha=8"], ["lora.lora_aplha", "lora.lora_alpha?"]),
        ({}, ["+model.attn_impl=sdpa"], ["model.attn_impl", "dtype"]),
        ({}, ["+optimizer.lrr=1e-3"], ["optimizer.lrr", "optimizer.lr?"]),
    ],
    ids=["lora-file-typo", "lora-plus-typo", "model-plus-key", "optimizer-plus-typo"],
)
def test_an_unknown_key_is_a_named_error_with_the_valid_keys(tmp_path, files, overrides, needles):
    cfg = compose_with(tmp_path, [user_conf(tmp_path, files), *overrides])
    with pytest.raises(ValueError, match="Valid keys: ") as info:
        validate(cfg)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_a_multirun_over_single_target_names_is_refused_before_loading(tmp_path):
    overrides = ["lora.target_modules=q_proj", "lora.r=4"]
    validate(compose_with(tmp_path, overrides))  # one run: find_targets judges it on the model
    cfg = compose_with(tmp_path, overrides, multirun=True)  # one job of `-m ...=q_proj,v_proj`
    with pytest.raises(ValueError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "a string is a regex that must match the whole module name" in msg
    assert "lora.target_modules='[q_proj," in msg and "quotes needed in a multirun" in msg


@pytest.mark.parametrize("native", [True, False])
def test_bf16_precision_falls_back_to_32_bit_on_a_cpu_without_bf16(
    tmp_path, monkeypatch, caplog, native
):
    from lorafit import runinfo

    monkeypatch.setattr(runinfo, "cpu_has_bf16", lambda: native)
    cfg = compose_with(tmp_path, ["trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "bf16-mixed"
    with caplog.at_level("INFO", logger="lorafit"):
        validate(cfg)
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert cfg.model.dtype == ("bfloat16" if native else "float32")  # the built-in's bf16 base
    assert ("no native bfloat16" in caplog.text) is not native


def check_gpu_strategy(strategy, model) -> None:
    """A GPU-only strategy preset builds its strategy object here (FSDP, with the model's layer
    class as wrap unit), or, for DeepSpeed where it is not installed, fails naming deepspeed."""
    from lorafit.distributed import layer_classes, strategy_kwargs

    if strategy._target_.endswith("FSDPStrategy"):
        built = strategy_kwargs(strategy, model)["strategy"]
        assert built.kwargs["use_orig_params"] is True
        assert layer_classes(model) == {type(model.model.layers[0])}
        return
    assert strategy._target_.endswith("DeepSpeedStrategy") and strategy.stage in (2, 3)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="(?i)deepspeed"):
            instantiate(strategy)
    else:
        assert instantiate(strategy).config["zero_optimization"]["stage"] == strategy.stage
