"""The base model an adapter goes on: find the adapter folder, resolve its base (``--base``, a
built-in name, or ``base_model_name_or_path``), size a classifier head like the saved one, and load
the base in float32. Shared by ``lorafit merge``, ``generate`` and ``analyze``; every fault is a
:class:`MergeError` (a ``ValueError``) or an ``OSError`` naming the file or key and the fix.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from lorafit.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_weights
from lorafit.models import AUTO_CLASSES, builtin_model, label_kwargs, resolve_model_dir

log = logging.getLogger(__name__)


class MergeError(ValueError):
    """A merge that cannot be done or failed its check; the message says what to change."""


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """A run folder (``path/adapter``) or an adapter folder -> the adapter folder.

    Raises:
        FileNotFoundError: Neither holds ``adapter_config.json``.
    """
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} is neither a run folder (with adapter/{CONFIG_NAME}) nor an adapter folder "
        f"(with {CONFIG_NAME}). Give the folder `lorafit train` wrote, or its adapter/ subfolder."
    )


def resolve_base(name_or_path: str | os.PathLike | None, adapter_dir: Path | None = None) -> str:
    """A base model folder from ``--base``, a built-in name, or the adapter's config.

    A name that is not a built-in and not a folder with ``config.json`` is taken for a hub id
    only when it has a hub id's form (``org/name``, no ``./``, ``~`` or ``\\``) and no folder of
    that path exists; a path that no longer exists (a deleted cache or training folder) is an
    error naming ``base_model_name_or_path`` and ``--base``.

    Raises:
        MergeError: No base given and the adapter names none, or the folder is missing.
    """
    key = f"base_model_name_or_path in {adapter_dir}/{CONFIG_NAME}" if adapter_dir else ""
    if name_or_path is None and adapter_dir is not None:
        config = read_adapter_config(adapter_dir)
        name_or_path = config.get("base_model_name_or_path")
    else:
        config, key = {}, f"--base {name_or_path}"
    if not name_or_path:
        raise MergeError(
            f"No base model: {adapter_dir}/{CONFIG_NAME} has no base_model_name_or_path. "
            "Pass --base DIR_OR_BUILTIN (e.g. --base smollm2_135m)."
        )
    builtin = builtin_model(str(name_or_path))
    if builtin is not None:
        return resolve_model_dir(builtin)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    if path.exists() or not _HUB_ID.fullmatch(str(name_or_path)):
        what = "has no config.json" if path.exists() else "does not exist"
        trained = (config.get("lorafit") or {}).get("model")
        hint = (
            f" (e.g. --base {trained}: the built-in lorafit.json names)"
            if (trained and builtin_model(str(trained)) is not None)
            else ""
        )
        raise MergeError(
            f"Base model folder {path} ({key}) {what} here. Pass --base with the folder or "
            f"built-in name of the model the adapter was trained on{hint}."
        )
    return str(name_or_path)


# A hub id: "name" or "org/name" (letters, digits, "-", "_", "."), not a relative path.
_HUB_ID = re.compile(r"(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?")


def head_kwargs(adapter_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` kwargs that size a classifier head like the adapter's saved one.

    lorafit writes the label names under ``config["lorafit"]["id2label"]``; for other SEQ_CLS
    adapters (PEFT's own) the label count is read from the saved head weight
    ``(num_labels, hidden)``: ``classifier.weight``, ``score.weight`` or
    ``classifier.out_proj.weight`` (RoBERTa). Empty for other task types.
    """
    if config.get("task_type") != "SEQ_CLS":
        return {}
    id2label = (config.get("lorafit") or {}).get("id2label")
    if id2label:
        return label_kwargs([id2label[str(i)] for i in range(len(id2label))])
    heads = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
    for key, t in read_weights(adapter_dir / WEIGHTS_NAME).items():  # corrupt: named ValueError
        # "base_model.model.classifier.weight"; not "pre_classifier.weight"
        if any(key == h or key.endswith("." + h) for h in heads):
            return {"num_labels": t.shape[0]}
    return {}


def load_base(
    base_dir: str,
    tokenizer_dir: Path | None,
    task_type: str = "CAUSAL_LM",
    quantization: str | None = None,
    **model_kwargs: Any,
):
    """Load the base model in float32 (eval mode, frozen) and a tokenizer that can pad; with
    ``quantization`` (``nf4``/``int8``), quantized as the adapter trained on it, then dequantized.

    The tokenizer comes from ``tokenizer_dir`` (lorafit saves it beside the adapter) when it holds
    one, else from the base. ``model_kwargs`` go to ``from_pretrained`` (e.g. :func:`head_kwargs`).
    Returns ``(model, tokenizer)``.
    """
    auto = AUTO_CLASSES.get(task_type or "CAUSAL_LM")
    if auto is None:
        raise MergeError(f"task_type {task_type!r} is not supported; use CAUSAL_LM or SEQ_CLS.")
    if quantization:  # the weights a quantized run trained against, then dequantized
        from lorafit.models import quantization_kwargs

        model_kwargs.update(quantization_kwargs(quantization, torch.float32))
    try:
        model = auto.from_pretrained(base_dir, dtype=torch.float32, **model_kwargs)
    except OSError as e:  # a hub id that is not cached and no hub reachable, a broken folder
        raise MergeError(
            f"Cannot load the base model {base_dir!r} ({type(e).__name__}: {e}). If it came from "
            f"the adapter's base_model_name_or_path ({CONFIG_NAME}), pass --base with a local "
            "folder or built-in name of the model the adapter was trained on."
        ) from None
    if quantization:
        model = model.dequantize().float()
        log.warning("Merging into the %s-quantized base, dequantized to float32.", quantization)
    model.eval().requires_grad_(False)
    has_tok = tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if has_tok else base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
