"""LoRA variants on tiny random models, with PEFT as the numeric reference: DoRA, LoRA on
nn.Embedding and on GPT-2's Conv1D, PiSSA/OLoRA inits (saved converted to the original base),
per-module ranks, LoRA+ parameter groups."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lorafit.adapters import load_adapter, save_adapter
from lorafit.lora import (
    LoRAEmbedding,
    LoRALinear,
    disable_lora,
    inject_lora,
    lora_modules,
    loraplus_adamw,
    merge_lora,
    param_groups,
    unmerge_lora,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Random A, B (and DoRA magnitudes near their start) so that no check is trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.normal_(std=0.1)
            m.lora_B.normal_(std=0.1)
            if m.use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude_vector))


def save(model, path, **kw):
    args = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTN, use_rslora=False)
    return save_adapter(model, path, base_model_name_or_path=None, **{**args, **kw})


def peft_logits(base: nn.Module, adapter_dir, ids) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def check_merge_exact(model, ids) -> None:
    """Merged logits equal unmerged ones, and unmerging gives the base weights back (float32)."""
    before = {n: m.base_layer.weight.clone() for n, m in lora_modules(model)}
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
        unmerge_lora(model)
        again = model(ids).logits
    assert (merged - unmerged).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5
    for n, m in lora_modules(model):
        assert (m.base_layer.weight - before[n]).abs().max() < 1e-5, n


# --- DoRA ---


def test_dora_starts_at_the_base_and_matches_peft_outputs_and_gradients(make_llama, input_ids):
    base, ours = make_llama(), make_llama()
    inject_lora(ours, ATTN, r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():
        assert (ours(input_ids).logits - base(input_ids).logits).abs().max() < 1e-5
    randomise(ours)
    theirs = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True)
    )
    state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items()}
    for name, m in lora_modules(ours):  # copy ours into PEFT's model
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"].copy_(m.lora_A.detach())
        state[f"{prefix}.lora_B.weight"].copy_(m.lora_B.detach())
        state[f"{prefix}.lora_magnitude_vector.weight"].copy_(m.lora_magnitude_vector.detach())
    theirs.eval()
    ours(input_ids).logits.square().mean().backward()
    theirs(input_ids).logits.square().mean().backward()
    ref = dict(theirs.named_parameters())
    for name, m in lora_modules(ours):
        prefix = f"base_model.model.{name}"
        for mine, key in [
            (m.lora_A, "lora_A.default.weight"),
            (m.lora_B, "lora_B.default.weight"),
            (m.lora_magnitude_vector, "lora_magnitude_vector.default.weight"),
        ]:  # equal gradients: the norm is detached as in PEFT
            assert torch.allclose(mine.grad, ref[f"{prefix}.{key}"].grad, atol=1e-6), key
    with torch.no_grad():
        assert (ours(input_ids).logits - theirs(input_ids).logits).abs().max() < 1e-4


def test_dora_merge_unmerge_exact_and_peft_round_trip(make_llama, input_ids, tmp_path):
    model = make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8, use_dora=True)
    randomise(model)
    check_merge_exact(model, input_ids)
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert magnitude in keys and len(keys) == 3 * 4 * 2  # A, B, magnitude x 4 modules x 2 layers
    with torch.no_grad():
        tuned = model(input_ids).logits
    assert (peft_logits(make_llama(), tmp_path, input_ids) - tuned).abs().max() < 1e-4
    back = make_llama()
    load_adapter(back, tmp_path)
    with torch.no_grad():
        assert (back(input_ids).logits - tuned).abs().max() < 1e-5


def test_peft_dora_adapter_loads_in_lorafit(make_llama, input_ids, tmp_path):
    theirs = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True)
    )
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path)
    ours = make_llama()
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert (ours(input_ids).logits - theirs(input_ids).logits).abs().max() < 1e-4


# --- nn.Embedding and Conv1D ---


def test_embedding_lora_matches_peft_layout_merges_and_round_trips(make_llama, input_ids, tmp_path):
    targets = ["embed_tokens", "q_proj"]
    model = make_llama()
    inject_lora(model, targets, r=4, lora_alpha=8)
    emb = model.model.embed_tokens
    assert isinstance(emb, LoRAEmbedding) and emb.lora_A.shape == (4, 128)
    assert emb.lora_B.shape == (64, 4) and torch.all(emb.lora_A == 0)  # PEFT's init: A zeros
    randomise(model)
    check_merge_exact(model, input_ids)
    save(model, tmp_path, target_modules=targets)
    peft_model = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    peft_model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft/adapter_model.safetensors")
    )  # the same key names (lora_embedding_A/B without .weight)
    with torch.no_grad():
        tuned = model(input_ids).logits
    assert (peft_logits(make_llama(), tmp_path, input_ids) - tuned).abs().max() < 1e-4
    back = make_llama()
    load_adapter(back, tmp_path)
    with torch.no_grad():
        assert (back(input_ids).logits - tuned).abs().max() < 1e-5


def test_a_tied_embedding_target_is_refused_without_untying(make_llama):
    with pytest.raises(ValueError, match="selects model.embed_tokens.*untie_word_embeddings"):
        inject_lora(make_llama(tie_word_embeddings=True), ["embed_tokens"], r=2, lora_alpha=4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv1d_lora_merges_exactly_and_round_trips_through_peft(tmp_path, use_dora):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = ["c_attn", "c_proj", "c_fc"]
    model = tiny_gpt2()
    with torch.no_grad():
        base = model(ids).logits
    report = inject_lora(model, "all-linear", r=4, lora_alpha=8, use_dora=use_dora)
    assert len(report.modules) == 2 * 4  # attn c_attn, c_proj; mlp c_fc, c_proj per block
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)  # Conv1D 32 -> 96
    with torch.no_grad():
        assert (model(ids).logits - base).abs().max() < 1e-5
    randomise(model)
    check_merge_exact(model, ids)
    save(model, tmp_path, target_modules=targets)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config.get("use_dora", False) is use_dora
    with torch.no_grad():
        tuned = model(ids).logits
    assert (tuned - base).abs().max() > 1e-3
    assert (peft_logits(tiny_gpt2(), tmp_path, ids) - tuned).abs().max() < 1e-4
    back = tiny_gpt2()
    load_adapter(back, tmp_path)
    with torch.no_grad():
        assert (back(ids).logits - tuned).abs().max() < 1e-5


# --- PiSSA / OLoRA / gaussian ---


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_base_changing_init_matches_peft_and_saves_a_converted_adapter(
    make_llama, input_ids, tmp_path, init
):
    base = make_llama()
    with torch.no_grad():
        original = base(input_ids).logits
    model = make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8, init=init)
    with torch.no_grad():
        assert (model(input_ids).logits - original).abs().max() < 1e-4  # W_res + s B0 A0 = W
    q = model.model.layers[0].self_attn.q_proj
    assert (q.base_layer.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3
    if init != "pissa_niter_4":  # randomised SVD: not PEFT's random draws
        theirs = peft.get_peft_model(
            make_llama(),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=init),
        )
        ref = theirs.base_model.model.model.layers[0].self_attn.q_proj
        assert torch.allclose(q.delta_weight(), ref.get_delta_weight("default"), atol=1e-5)
        assert torch.allclose(q.base_layer.weight, ref.base_layer.weight, atol=1e-5)
    randomise(model)  # "training"
    with torch.no_grad():
        tuned = model(input_ids).logits
        with disable_lora(model):  # disabled still means the original base
            assert (model(input_ids).logits - original).abs().max() < 1e-4
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    extra = json.loads((tmp_path / "lorafit.json").read_text())
    assert extra["init"]["lora_init"] == init.split("_")[0]
    untouched = make_llama()
    load_adapter(untouched, tmp_path)
    with torch.no_grad():
        assert (untouched(input_ids).logits - tuned).abs().max() < 1e-4
    assert (peft_logits(make_llama(), tmp_path, input_ids) - tuned).abs().max() < 1e-4


def test_converted_rslora_keeps_the_scaling(make_llama, input_ids, tmp_path):
    model = make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8, init="olora", use_rslora=True)
    randomise(model)
    with torch.no_grad():
        tuned = model(input_ids).logits
    save(model, tmp_path, use_rslora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * 2**0.5)
    assert (peft_logits(make_llama(), tmp_path, input_ids) - tuned).abs().max() < 1e-4


def test_gaussian_init_and_bad_inits(make_llama):
    model = make_llama()
    inject_lora(model, ["q_proj"], r=4, lora_alpha=8, init="gaussian")
    a = model.model.layers[0].self_attn.q_proj.lora_A
    assert 0.15 < a.std().item() < 0.35 and a.mean().abs() < 0.1  # std 1 / r
    with pytest.raises(ValueError, match="lora.init='svd'"):
        inject_lora(make_llama(), ["q_proj"], r=4, lora_alpha=8, init="svd")
    with pytest.raises(ValueError, match="use_dora"):
        inject_lora(make_llama(), ["q_proj"], r=4, lora_alpha=8, init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="nn.Embedding"):
        inject_lora(make_llama(), ["embed_tokens"], r=4, lora_alpha=8, init="olora")


# --- rank_pattern / alpha_pattern ---


def test_rank_and_alpha_pattern_round_trip_through_peft(make_llama, input_ids, tmp_path):
    model = make_llama()
    patterns = dict(rank_pattern={r".*v_proj": 8}, alpha_pattern={"o_proj": 32})
    inject_lora(model, ATTN, r=4, lora_alpha=8, **patterns)
    assert model.model.layers[1].self_attn.v_proj.r == 8
    assert model.model.layers[1].self_attn.o_proj.lora_alpha == 32
    randomise(model)
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.v_proj": 8 for i in (0, 1)}
    assert set(config["alpha_pattern"].values()) == {32}
    with torch.no_grad():
        tuned = model(input_ids).logits
    assert (peft_logits(make_llama(), tmp_path, input_ids) - tuned).abs().max() < 1e-4
    # and PEFT's own patterns (regex keys) load in lorafit
    theirs = peft.get_peft_model(
        make_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, **patterns)
    )
    randomise(model)
    theirs.save_pretrained(tmp_path / "peft")
    back = make_llama()
    load_adapter(back, tmp_path / "peft")
    assert back.model.layers[0].self_attn.v_proj.r == 8


# --- LoRA+ ---


def test_param_groups_and_loraplus_learning_rates(make_llama):
    model = make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8, use_dora=True)
    groups = param_groups(model)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B", "lora_magnitude"]
    assert [len(g["params"]) for g in groups] == [8, 8, 8]
    optimizer = loraplus_adamw(groups, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"lora_A": 1e-3, "lora_B": pytest.approx(16e-3), "lora_magnitude": 1e-3}
    with pytest.raises(ValueError, match="named parameter groups"):
        loraplus_adamw([p for g in groups for p in g["params"]], lr=1e-3)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a number > 0"):
        loraplus_adamw(groups, lr=1e-3, loraplus_lr_ratio=0)
    full = make_llama().requires_grad_(True)
    with pytest.raises(ValueError, match="no LoRA layers"):
        loraplus_adamw(param_groups(full), lr=1e-3)


# --- QLoRA: a bitsandbytes-quantized frozen base ---


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_like_its_dequantized_copy(make_llama, tmp_path, quantization):
    """The LoRA path stays float32 and its gradients through the quantized base equal those
    through the dequantized float32 base (bitsandbytes' CPU backend)."""
    pytest.importorskip("bitsandbytes")
    from lorafit.models import ModelConfig, load_model

    make_llama().save_pretrained(tmp_path)  # hidden 64: CPU 4-bit kernels pack 64 inputs
    ids = torch.tensor([[1, 40, 30, 25, 9], [5, 6, 7, 8, 9]])
    grads = []
    for dequantize in (False, True):
        model = load_model(str(tmp_path), ModelConfig(quantization=quantization))
        assert type(model.model.layers[0].self_attn.q_proj).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if dequantize:
            model = model.dequantize().float()
        else:
            with pytest.raises(ValueError, match="use_dora=true with model.quantization"):
                inject_lora(model, ["q_proj"], r=4, lora_alpha=8, use_dora=True)
            with pytest.raises(ValueError, match="lora.init='pissa' with a quantized base"):
                inject_lora(model, ["q_proj"], r=4, lora_alpha=8, init="pissa")
        inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
        randomise(model)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.lora_A.dtype == torch.float32
        model.train()
        model(ids).logits.square().mean().backward()
        grads.append([m.lora_A.grad for _, m in lora_modules(model)])
        if not dequantize:
            with pytest.raises(ValueError, match="quantized"):
                layer.merge()
    for quantized, plain in zip(*grads, strict=True):
        assert torch.allclose(quantized, plain, atol=1e-8, rtol=1e-4)
        assert plain.abs().max() > 0


def test_unknown_quantization_names_the_key():
    from lorafit.models import ModelError, quantization_kwargs

    with pytest.raises(ModelError, match="model.quantization='int4'"):
        quantization_kwargs("int4", torch.float32)
