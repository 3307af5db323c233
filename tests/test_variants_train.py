"""Each LoRA variant end to end: 3 steps of `lorafit.train` on a tiny random Llama with SmolLM2's
real tokenizer and the built-in conversations; the saved adapter loads in PEFT and in lorafit with
equal logits."""

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.adapters import load_adapter
from lorafit.artifacts import read_logged
from lorafit.config import group_object
from lorafit.lora import LoRAConfig
from tiny_runs import EXACT, TINY, adapter, compose_run, save_tiny_smol, train_run

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 400, 3000, 25, 9, 77, 1200, 2]])


@pytest.fixture(scope="module")
def tiny(smol_tokenizer, tmp_path_factory) -> Path:
    return save_tiny_smol(tmp_path_factory.mktemp("tiny") / "model", smol_tokenizer)


def run(tmp_path: Path, tiny: Path, *overrides: str) -> dict:
    common = [
        "model=hf",
        f"model.name_or_path={tiny}",
        "data.max_train_examples=12",
        "data.batch_size=2",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        *EXACT,
    ]
    return train_run(tmp_path, *common, *overrides)


def logits_both_ways(tiny: Path, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the untouched base with the adapter loaded by lorafit, and by PEFT."""
    ours = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    load_adapter(ours, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return ours(IDS).logits, theirs(IDS).logits


def test_dora_run(tmp_path, tiny):
    metrics = run(tmp_path, tiny, "lora.use_dora=true")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = adapter(tmp_path)
    magnitudes = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 4 * 2  # q, k, v, o in 2 layers
    ours, theirs = logits_both_ways(tiny, tmp_path / "adapter")
    assert (ours - theirs).abs().max() < 1e-4
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_run_saves_the_converted_adapter(tmp_path, tiny, init):
    plain = run(tmp_path / "plain", tiny, "trainer.max_steps=1")
    metrics = run(tmp_path / init, tiny, f"lora.init={init}")
    # W_res + s B0 A0 = W: the run starts from the base's own loss
    assert metrics["eval_loss_before"] == pytest.approx(plain["eval_loss_before"], abs=1e-4)
    folder = tmp_path / init / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["init_lora_weights"]
    ours, theirs = logits_both_ways(tiny, folder)  # on the untouched base
    assert (ours - theirs).abs().max() < 1e-4


def test_loraplus_run_logs_one_learning_rate_per_group(tmp_path, tiny):
    run(tmp_path, tiny, "optimizer=loraplus", "scheduler=constant", "trainer.log_every_n_steps=1")
    csv = tmp_path / "csv/metrics.csv"
    a, b = read_logged(csv, "lr-AdamW/lora_A"), read_logged(csv, "lr-AdamW/lora_B")
    assert a and len(a) == len(b)
    assert all(vb == pytest.approx(16 * va) for (_, va), (_, vb) in zip(a, b, strict=True))


def test_embedding_target_run(tmp_path, tiny):
    run(tmp_path, tiny, "lora.target_modules=[q_proj,embed_tokens]")
    keys = adapter(tmp_path)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    ours, theirs = logits_both_ways(tiny, tmp_path / "adapter")
    assert (ours - theirs).abs().max() < 1e-4


def test_rank_pattern_from_the_command_line(tmp_path, tiny):
    for overrides in (["+lora.rank_pattern.v_proj=16"], ["lora.rank_pattern={v_proj:16}"]):
        cfg = compose_run(tmp_path / "cfg", overrides)
        assert group_object(LoRAConfig, cfg.lora, "lora").rank_pattern == {"v_proj": 16}
    cfg = compose_run(tmp_path / "cfg", [r"lora.rank_pattern={layers\.0\..*v_proj:16}"])
    assert group_object(LoRAConfig, cfg.lora, "lora").rank_pattern == {r"layers\.0\..*v_proj": 16}
    run(tmp_path / "run", tiny, "lora.rank_pattern={v_proj:16}", "lora.alpha_pattern={o_proj:64}")
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {16} and len(config["rank_pattern"]) == 2
    assert set(config["alpha_pattern"].values()) == {64}
    ours, theirs = logits_both_ways(tiny, tmp_path / "run/adapter")
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_run_and_merge(tmp_path, smol_tokenizer, quantization):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.merge import merge_to_folder

    # bitsandbytes' CPU 4-bit kernels pack blocks of 64 inputs: every layer needs in >= 64.
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY, "hidden_size": 64, "intermediate_size": 128},
        vocab_size=len(smol_tokenizer),
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    tiny = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(tiny)
    smol_tokenizer.save_pretrained(tiny)

    metrics = run(tmp_path / "run", tiny, f"model.quantization={quantization}")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    extra = json.loads((tmp_path / "run/adapter/lorafit.json").read_text())
    assert extra["base_quantization"] == quantization
    tensors = adapter(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # the LoRA path stays float
    report = merge_to_folder([tmp_path / "run"], tmp_path / "merged", "float32")
    assert report["passed"] and report["base_quantization"] == quantization
    assert report["max_abs_diff"] < 1e-4


def test_merge_of_a_pissa_adapter_reproduces_the_tuned_model(tmp_path, tiny):
    """The converted adapter merges into the original base and gives the tuned model's logits."""
    from lorafit.adapters import save_adapter
    from lorafit.lora import inject_lora, lora_modules
    from lorafit.merge import merge_to_folder

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, init="pissa")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):  # "training"
            m.lora_A.add_(0.05 * torch.randn_like(m.lora_A))
            m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))
        tuned = model(IDS).logits
    save_adapter(
        model, tmp_path / "adapter", r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"], use_rslora=False, base_model_name_or_path=str(tiny),
    )  # fmt: skip
    report = merge_to_folder([tmp_path / "adapter"], tmp_path / "merged", "float32")
    assert report["passed"] and report["r"] == 8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(IDS).logits - tuned).abs().max() < 1e-4
