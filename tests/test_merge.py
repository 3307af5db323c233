"""`lorafit merge`: verified merged export on tiny Llamas (real tokenizer), and its bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

import lorafit.lora
from lorafit.adapters import load_adapter, save_adapter
from lorafit.cli import main
from lorafit.lora import LoRALinear, inject_lora, lora_modules
from lorafit.merge import MergeError, merge_to_folder

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
SMOL_VOCAB = 49152


@pytest.fixture
def base_dir(make_llama, smol_tokenizer, tmp_path) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder."""
    path = tmp_path / "base"
    make_llama(vocab_size=SMOL_VOCAB).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def write_adapter(
    model: nn.Module, path: Path, base: Path, r=4, targets=ATTN, seed=1, untie=False
) -> Path:
    """Inject LoRA with random lora_B (so merging changes the weights) and save it."""
    tie = {"untie_embeddings": True} if untie else {}
    inject_lora(model, targets, r=r, lora_alpha=8, lora_dropout=0.1, **tie)  # dropout: must be off
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.05)
    kw = dict(r=r, lora_alpha=8, lora_dropout=0.1, use_rslora=False)
    return save_adapter(model, path, target_modules=targets, base_model_name_or_path=base, **kw)


@pytest.fixture
def tied_base_dir(make_llama, smol_tokenizer, tmp_path) -> Path:
    """As ``base_dir``, with the output head tied to the input embedding (as SmolLM2's)."""
    path = tmp_path / "tied_base"
    make_llama(vocab_size=SMOL_VOCAB, tie_word_embeddings=True).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def adapter_dir(make_llama, base_dir, tmp_path) -> Path:
    return write_adapter(make_llama(vocab_size=SMOL_VOCAB), tmp_path / "run" / "adapter", base_dir)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_merge_float32_writes_plain_verified_folder(make_llama, adapter_dir, base_dir, tmp_path):
    out = tmp_path / "merged"
    report = merge_to_folder([adapter_dir.parent], out)  # a run folder works as well
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "merge_report.json",
    } <= names
    assert "tokenizer.json" in names and not leftovers(tmp_path)
    keys = load_file(out / "model.safetensors").keys()
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert report == json.loads((out / "merge_report.json").read_text())
    assert report["max_abs_diff"] < 1e-4 and report["top1_agreement"] == 1.0 and report["passed"]
    assert report["tolerance_abs"] == max(1e-4, 1e-5 * report["max_abs_logit"]) > 0
    assert report["task_type"] == "CAUSAL_LM"
    assert report["positions"] > 60  # the chat prompts and the plain text, padding excluded
    # Plain transformers loads it completely and matches the unmerged adapter model.
    merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert getattr(merged.config, "quantization_config", None) is None
    unmerged = make_llama(vocab_size=SMOL_VOCAB)
    load_adapter(unmerged, adapter_dir)
    unmerged.eval()  # the LoRA layers come in training mode (dropout on)
    ids = torch.tensor([[1, 5, 900, 31, 7000]])
    with torch.no_grad():
        base_diff = (make_llama(vocab_size=SMOL_VOCAB)(ids).logits - unmerged(ids).logits).abs()
        diff = (merged.eval()(ids).logits - unmerged(ids).logits).abs().max().item()
    assert diff < 1e-4 and base_diff.max() > 1e-2  # the adapter matters, and the merge keeps it


def test_merge_bfloat16_checks_the_merge_in_float32_and_reports_the_cast(adapter_dir, tmp_path):
    fp32 = merge_to_folder([adapter_dir], tmp_path / "fp32")
    bf16 = merge_to_folder([adapter_dir], tmp_path / "bf16", "bfloat16")
    # The merge check is the float32 one at every dtype, with the float32 tolerance.
    assert bf16["max_abs_diff"] == fp32["max_abs_diff"] < 1e-4
    assert bf16["tolerance_abs"] == fp32["tolerance_abs"] == max(1e-4, 1e-5 * fp32["max_abs_logit"])
    # The cast's rounding is reported separately, against its own bound.
    assert fp32["cast"]["max_abs_diff"] == 0 and bf16["cast"]["tolerance_abs"] == 4.0
    assert bf16["cast"]["max_abs_diff"] > 100 * max(fp32["max_abs_diff"], 1e-7)
    assert bf16["saved"]["max_abs_diff"] == 0  # the reloaded folder computes what was written
    assert bf16["passed"] and bf16["dtype"] == "bfloat16" and bf16["dtype_source"] == "--dtype"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(iter(load_file(tmp_path / "bf16" / "model.safetensors").values())).dtype == (
        torch.bfloat16
    )


def test_failed_check_leaves_nothing(adapter_dir, tmp_path):
    with pytest.raises(MergeError, match="differs from the unmerged one") as err:
        merge_to_folder([adapter_dir], tmp_path / "out", "bfloat16", atol=1e-9)
    assert "Nothing was written" in str(err.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    report = merge_to_folder([adapter_dir], tmp_path / "out", "bfloat16", atol=1e-9, verify=False)
    assert not report["passed"] and (tmp_path / "out" / "model.safetensors").is_file()


def _skip_first_layer(monkeypatch):
    real, seen = LoRALinear.merge, []

    def merge(self):
        seen.append(self)
        if len(seen) == 1:  # one layer "merged" without its update
            self.merged = True
            return
        real(self)

    monkeypatch.setattr(LoRALinear, "merge", merge)


def _double_scaling(monkeypatch):
    @torch.no_grad()
    def merge(self):
        w = self.base_layer.weight
        w.copy_((w.float() + 2 * self.delta_weight()).to(w.dtype))
        self.merged = True

    monkeypatch.setattr(LoRALinear, "merge", merge)


def _keep_head_tied(monkeypatch):  # the untie step skipped: the merge lands in the embedding too
    monkeypatch.setattr(lorafit.lora, "untie_output_head", lambda *args: None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("wrong", [_skip_first_layer, _double_scaling])
def test_a_wrong_merge_fails_verification_at_every_dtype(
    adapter_dir, tmp_path, monkeypatch, wrong, dtype
):
    wrong(monkeypatch)
    with pytest.raises(MergeError, match="differs from the unmerged one"):
        merge_to_folder([adapter_dir], tmp_path / "out", dtype)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_merge_into_a_tied_head_fails_verification_at_every_dtype(
    make_llama, tied_base_dir, tmp_path, monkeypatch, dtype
):
    model = make_llama(vocab_size=SMOL_VOCAB, tie_word_embeddings=True)
    targets = [*ATTN, "lm_head"]
    adapter = write_adapter(model, tmp_path / "a", tied_base_dir, targets=targets, untie=True)
    _keep_head_tied(monkeypatch)
    with pytest.raises(MergeError, match="The merge is wrong: .* both float32"):
        merge_to_folder([adapter], tmp_path / "out", dtype, untie_embeddings=True)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="exists; choose another --out or pass --overwrite"):
        merge_to_folder([adapter_dir], out)
    assert (out / "old.txt").is_file()
    merge_to_folder([adapter_dir], out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert not leftovers(tmp_path)


def test_write_failing_midway_leaves_no_folder(adapter_dir, tmp_path, monkeypatch):
    real = PreTrainedModel.save_pretrained

    def save_then_fail(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)  # the weights are on disk when the "disk" fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        merge_to_folder([adapter_dir], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_weighted_merge_equals_combined_adapter(make_llama, base_dir, tmp_path):
    a = write_adapter(make_llama(vocab_size=SMOL_VOCAB), tmp_path / "a", base_dir, r=4, seed=1)
    b = write_adapter(
        make_llama(vocab_size=SMOL_VOCAB), tmp_path / "b", base_dir, r=2, targets=["v_proj"], seed=2
    )
    report = merge_to_folder([a, b], tmp_path / "out", weights=[0.7, 0.3])
    assert report["combination"] == "cat" and report["r"] == 6 and report["passed"]
    assert report["max_abs_diff"] < 1e-4 and report["weights"] == [0.7, 0.3]


def test_cli_merge_and_errors(adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(adapter_dir), "--out", str(out)]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    assert main(["merge", str(adapter_dir), "--out", str(out)]) == 1
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "lorafit merge: error:" in err and "neither a run folder" in err
    assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "o3"), "--weights", "1"]) == 0
    assert main(["merge", str(adapter_dir), str(adapter_dir), "--out", str(tmp_path / "o4")]) == 1
    assert "2 adapters need --weights with 2 numbers" in capsys.readouterr().err


def test_missing_base_folder_is_named(adapter_dir, base_dir, tmp_path):
    base_dir.rename(tmp_path / "moved")
    with pytest.raises(
        MergeError, match="base_model_name_or_path in .* does not exist here. Pass --base"
    ):
        merge_to_folder([adapter_dir], tmp_path / "out")
    report = merge_to_folder([adapter_dir], tmp_path / "out", base=str(tmp_path / "moved"))
    assert report["base"] == str(tmp_path / "moved")


def test_head_kwargs_from_label_names_or_the_saved_head(tmp_path):
    from safetensors.torch import save_file

    from lorafit.merge import head_kwargs

    assert head_kwargs(tmp_path, {"task_type": "CAUSAL_LM"}) == {}
    names = {str(i): f"l{i}" for i in range(12)}  # JSON keys: "10" sorts before "2"
    kw = head_kwargs(tmp_path, {"task_type": "SEQ_CLS", "lorafit": {"id2label": names}})
    assert kw["num_labels"] == 12 and kw["id2label"][2] == "l2" and kw["label2id"]["l11"] == 11
    # A PEFT-made adapter: the count comes from the head's saved weight, not pre_classifier's.
    save_file(
        {
            "base_model.model.pre_classifier.weight": torch.zeros(8, 8),
            "base_model.model.classifier.weight": torch.zeros(3, 8),
        },
        tmp_path / "adapter_model.safetensors",
    )
    assert head_kwargs(tmp_path, {"task_type": "SEQ_CLS"}) == {"num_labels": 3}


def test_tied_head_adapter_names_the_tie_and_merges_untied_on_request(
    make_llama, tied_base_dir, tmp_path, capsys
):
    model = make_llama(vocab_size=SMOL_VOCAB, tie_word_embeddings=True)
    targets = ["q_proj", "lm_head"]
    adapter = write_adapter(model, tmp_path / "a", tied_base_dir, targets=targets, untie=True)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "ties that head's weight to the input embedding" in err and "--untie-embeddings" in err
    assert "differs" not in err and not (tmp_path / "o1").exists()
    out = tmp_path / "o2"
    assert main(["merge", str(adapter), "--out", str(out), "--untie-embeddings"]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tied_base_dir).eval()
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    unmerged = make_llama(vocab_size=SMOL_VOCAB, tie_word_embeddings=True)
    load_adapter(unmerged, adapter, untie_embeddings=True)
    ids = torch.tensor([[1, 5, 900, 31, 7000]])
    with torch.no_grad():
        diff = (merged(ids).logits - unmerged.eval()(ids).logits).abs().max().item()
        moved = (base(ids).logits - unmerged(ids).logits).abs().max().item()
    assert diff < 1e-4 and moved > 1e-2


def test_merge_keeps_the_base_dtype_unless_asked(make_llama, smol_tokenizer, tmp_path, capsys):
    base = tmp_path / "bf16_base"
    make_llama(vocab_size=SMOL_VOCAB).to(torch.bfloat16).save_pretrained(base)
    smol_tokenizer.save_pretrained(base)
    adapter = write_adapter(make_llama(vocab_size=SMOL_VOCAB), tmp_path / "a", base)
    out = tmp_path / "out"
    assert main(["merge", str(adapter), "--out", str(out)]) == 0
    assert "weights in bfloat16 (from the base's config.json)" in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["passed"] and report["max_abs_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert main(["merge", str(adapter), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert "weights in float32 (from --dtype)" in capsys.readouterr().out
    f32 = load_file(tmp_path / "f32" / "model.safetensors")
    assert {t.dtype for t in f32.values()} == {torch.float32}


def test_output_over_its_own_source_is_refused_even_with_overwrite(adapter_dir, tmp_path):
    run = adapter_dir.parent
    for out in (run, adapter_dir, tmp_path):  # the run, its adapter, a folder holding the run
        with pytest.raises(MergeError, match="holds the source"):
            merge_to_folder([run], out, overwrite=True)
    assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_a_model_template_is_not_a_builtin_base():
    from lorafit.models import builtin_model

    assert builtin_model("hf") is None  # conf/model/hf.yaml: name_or_path ???
    assert builtin_model("smollm2_135m").name == "smollm2_135m"
