"""Runner of the `adapters` area: adapter folders and base models that do not fit.

Each case builds a small LoRA adapter (r=4 on q_proj/v_proj) from a tiny random Llama made here,
saves it with `lorafit.adapters.save_adapter`, spoils it as `case.yaml` says, copies the case
folder's own files over it (real PEFT-made files, a few KB), and loads it through one public
entry point. Returns `TypeName: message` of the lorafit error; only ValueError/OSError
subclasses are caught, anything else (an exception from inside a library) propagates.

case.yaml keys beside kind/expect/message:
  via: load_adapter (default) | merge | generate | analyze | cli (with `argv`, where "{run}" is
      the run folder and "{tmp}" a scratch folder: returns what `lorafit` printed to stderr)
  adapter: LlamaConfig overrides of the model the adapter is trained on (e.g. hidden_size: 32)
  targets: its target_modules (default [q_proj, v_proj]; "all-linear")
  base: LlamaConfig overrides of the base it is loaded on (default: the adapter's model)
  config: fields set in adapter_config.json (null removes the field); "{gone}" in
      base_model_name_or_path becomes a folder that does not exist
  weights: truncate | garbage | empty | no_tensors | base_tensors | missing
  lorafit_json: text written over lorafit.json
  base_folder: deleted | no_config (what became of the base folder the adapter names)
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import TINY_LLAMA as TINY  # noqa: E402 (tests/ is on the path under pytest)
from lorafit.adapters import load_adapter, save_adapter

WORDS = ["[PAD]", "[UNK]", "</s>", "the", "a", "is", "what", "of", "capital", "france", "?", "."]


def llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def save_base(path: Path, **overrides) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved as a model folder."""
    llama(**overrides).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    ).save_pretrained(path)
    return path


def build_adapter(out: Path, base_dir: Path, overrides: dict, targets) -> Path:
    from lorafit.lora import inject_lora, lora_modules

    model = llama(**overrides)
    inject_lora(model, targets, r=4, lora_alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.05)
    return save_adapter(
        model,
        out,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=False,
        target_modules=targets,
        base_model_name_or_path=base_dir,
        extra={"model": "tiny"},
    )


def spoil_weights(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":  # a copy cut short, e.g. by a full disk
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":  # not a safetensors file at all (an HTML error page saved as it)
        path.write_bytes(b"<html><body>502 Bad Gateway</body></html>\n" * 4)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no_tensors":
        save_file({}, path)
    elif how == "base_tensors":  # the base model's own weights saved under the adapter's name
        state = llama().state_dict()
        save_file({k: state[k].contiguous() for k in list(state)[:6]}, path)
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(f"unknown weights spoiler {how!r}")


def run(case_dir: Path, case: dict, tmp_path: Path) -> str:
    base_dir = save_base(tmp_path / "base", **case.get("base", case.get("adapter", {})))
    adapter_dir = build_adapter(
        tmp_path / "run" / "adapter",
        base_dir,
        case.get("adapter", {}),
        case.get("targets", ["q_proj", "v_proj"]),
    )
    for f in case_dir.iterdir():  # real PEFT-made files stored with the case
        if f.name != "case.yaml":
            shutil.copy(f, adapter_dir / f.name)
    if "config" in case:
        config_path = adapter_dir / "adapter_config.json"
        config = json.loads(config_path.read_text())
        for key, value in case["config"].items():
            if isinstance(value, str):
                value = value.replace("{gone}", str(tmp_path / "gone"))
            config[key] = value
            if value is None:
                del config[key]
        config_path.write_text(json.dumps(config, indent=2))
    if "weights" in case:
        spoil_weights(adapter_dir / "adapter_model.safetensors", case["weights"])
    if "lorafit_json" in case:
        (adapter_dir / "lorafit.json").write_text(case["lorafit_json"])
    if case.get("base_folder") == "deleted":
        shutil.rmtree(base_dir)
    elif case.get("base_folder") == "no_config":
        (base_dir / "config.json").unlink()
    via = case.get("via", "load_adapter")
    try:
        if via == "load_adapter":
            load_adapter(llama(**case.get("base", case.get("adapter", {}))), adapter_dir)
        elif via == "merge":
            from lorafit.merge import merge_to_folder

            merge_to_folder([adapter_dir.parent], tmp_path / "merged")
        elif via == "generate":
            from lorafit.generate import load_for_generation

            load_for_generation(str(adapter_dir.parent))
        elif via == "analyze":
            from lorafit.analyze import analyze_adapter

            analyze_adapter(adapter_dir.parent)
        elif via == "cli":  # the command a user types: exit status 1 and one paragraph
            from lorafit.cli import main

            argv = [a.format(run=adapter_dir.parent, tmp=tmp_path) for a in case["argv"]]
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = main(argv)
            assert status == 1 and "Traceback" not in err.getvalue(), (status, err.getvalue())
            return err.getvalue()
        else:
            raise AssertionError(f"unknown via {via!r}")
    except (ValueError, OSError) as e:
        if via == "merge":
            assert not (tmp_path / "merged").exists(), "a failed merge left a folder"
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{case_dir.name}: no error raised via {via}")
