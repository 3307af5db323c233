"""Unit tests for lorafit.lora on tiny random Llamas, with PEFT as the numeric reference."""

import logging
import math

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.lora import (
    LoRALinear,
    count_params,
    disable_lora,
    inject_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
    unwrap_lora,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomise_b(model: nn.Module, seed: int = 0) -> None:
    """Give every lora_B random values so merge/forward tests are not trivially B == 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.02)


def test_lora_linear_shapes_init_and_repr():
    base = nn.Linear(16, 8)
    m = LoRALinear(base, r=4, lora_alpha=8)
    assert m.lora_A.shape == (4, 16) and m.lora_B.shape == (8, 4)
    assert torch.all(m.lora_B == 0) and m.lora_A.abs().sum() > 0
    assert m.scaling == 2.0
    assert LoRALinear(nn.Linear(16, 8), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert "r=4, lora_alpha=8, scaling=2" in repr(m)
    assert isinstance(LoRALinear(base, 4, 8, lora_dropout=0.1).lora_dropout, nn.Dropout)


def test_lora_linear_on_a_bf16_base_is_float32_and_follows_the_meta_device():
    """PEFT's autocast_adapter_dtype: a bf16 base (model.dtype) keeps a float32 adapter."""
    bf16 = LoRALinear(nn.Linear(16, 8, dtype=torch.bfloat16), r=2, lora_alpha=4)
    assert bf16.lora_A.dtype == bf16.lora_B.dtype == torch.float32
    assert bf16(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.device("meta"):
        meta = LoRALinear(nn.Linear(16, 8), r=2, lora_alpha=4)
    assert meta.lora_A.is_meta and meta.lora_B.is_meta


def test_forward_runs_float32_adapter_on_bf16_input():
    m = LoRALinear(nn.Linear(16, 8), r=2, lora_alpha=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(3, 16))
    assert y.shape == (3, 8)


def test_forward_equals_base_at_init(make_llama, input_ids):
    base, model = make_llama(), make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)


def test_merge_unmerge_and_merged_forward(make_llama, input_ids):
    model = make_llama()
    inject_lora(model, "all-linear", r=4, lora_alpha=16)
    randomise_b(model)
    before = {n: m.base_layer.weight.clone() for n, m in lora_modules(model)}
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merge_lora(model)
        merged = model(input_ids).logits
    assert all(m.merged for _, m in lora_modules(model))
    assert (merged - unmerged).abs().max() < 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for n, m in lora_modules(model):
        assert (m.base_layer.weight - before[n]).abs().max() < 1e-6
        assert not m.merged
    with pytest.warns(UserWarning, match="not merged"):
        unmerge_lora(model)


def test_grads_only_on_lora_params(make_llama, input_ids):
    model = make_llama().train()
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    randomise_b(model)
    model(input_ids, labels=input_ids).loss.backward()
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * 4 * 2  # 2 layers x 4 projections x (A, B)
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_state_dict_keys_and_counts(make_llama):
    model = make_llama()
    report = inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    state = lora_state_dict(model)
    assert list(state)[:2] == [
        "model.layers.0.self_attn.q_proj.lora_A",
        "model.layers.0.self_attn.q_proj.lora_B",
    ]
    assert state["model.layers.0.self_attn.v_proj.lora_B"].shape == (32, 4)  # 2 kv heads x 16
    n_lora = sum(t.numel() for t in state.values())
    assert report.trainable_params == n_lora == count_params(model)[0]
    assert [m[0] for m in report.modules][:2] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert report.modules[0][1:] == (64, 64, 4 * 64 + 64 * 4)
    assert "4 modules" in str(report) and f"{n_lora:,} trainable" in str(report)
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()


def test_llama2_7b_on_meta_device_trainable_count():
    cfg = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    report = inject_lora(model, ATTN, r=8, lora_alpha=16)
    assert report.trainable_params == 8_388_608  # 32 layers x 4 x 8 x (4096 + 4096)
    assert report.total_params == 6_738_415_616 + 8_388_608
    assert math.isclose(report.trainable_fraction, 8_388_608 / report.total_params)


def test_target_not_found_lists_linear_names(make_llama):
    with pytest.raises(ValueError) as err:
        inject_lora(make_llama(), ["q_proj", "qkv"], r=4, lora_alpha=8)
    msg = str(err.value)
    assert "'qkv'" in msg and "lora.target_modules=[...]" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in msg


def test_target_matches_only_by_suffix_and_only_linear(make_llama):
    with pytest.raises(ValueError, match="'proj'"):  # no substring matching
        inject_lora(make_llama(), ["proj"], r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="non-Linear modules: model.layers.0.mlp"):
        inject_lora(make_llama(), ["mlp"], r=4, lora_alpha=8)


def test_regex_targets(make_llama):
    model = make_llama()
    report = inject_lora(model, r"model\.layers\.1\.self_attn\.(q|v)_proj", r=2, lora_alpha=4)
    assert [m[0] for m in report.modules] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        inject_lora(make_llama(), "q_proj", r=2, lora_alpha=4)  # regex must match the full name


def test_all_linear_excludes_lm_head(make_llama):
    model = make_llama()
    report = inject_lora(model, "all-linear", r=2, lora_alpha=4)
    names = [m[0] for m in report.modules]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)


def test_exclude_modules(make_llama):
    report = inject_lora(
        make_llama(),
        "all-linear",
        r=2,
        lora_alpha=4,
        exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"],
    )
    names = [m[0] for m in report.modules]
    assert len(names) == 14 - 3
    assert "model.layers.1.self_attn.q_proj" in names and not any("down" in n for n in names)
    report = inject_lora(make_llama(), ATTN, r=2, lora_alpha=4, exclude_modules=r".*layers\.0\..*")
    assert len(report.modules) == 4
    with pytest.raises(ValueError, match="removes every target"):
        inject_lora(make_llama(), ["q_proj"], r=2, lora_alpha=4, exclude_modules=["q_proj"])


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank(make_llama, r):
    with pytest.raises(ValueError, match=r"lora\.r must be an integer >= 1"):
        inject_lora(make_llama(), ATTN, r=r, lora_alpha=8)


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_bad_alpha(make_llama, alpha):
    with pytest.raises(ValueError, match=r"lora\.lora_alpha must be a number > 0"):
        inject_lora(make_llama(), ATTN, r=4, lora_alpha=alpha)


def test_rank_above_layer_size_warns(make_llama, caplog):
    with caplog.at_level(logging.WARNING, logger="lorafit.lora"):
        inject_lora(make_llama(), ["k_proj", "q_proj"], r=48, lora_alpha=8)
    assert "lora.r=48 exceeds" in caplog.text
    assert "model.layers.0.self_attn.k_proj (64->32)" in caplog.text  # 48 > 32
    assert "q_proj" not in caplog.text  # 48 <= 64


def test_inject_twice_raises(make_llama):
    model = make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject_lora(model, ATTN, r=4, lora_alpha=8)


def test_rank_and_alpha_pattern(make_llama):
    model = make_llama()
    inject_lora(
        model,
        ATTN,
        r=4,
        lora_alpha=8,
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 2},
    )
    mods = dict(lora_modules(model))
    assert mods["model.layers.1.self_attn.q_proj"].r == 2
    assert mods["model.layers.0.self_attn.q_proj"].r == 4
    assert mods["model.layers.0.self_attn.v_proj"].lora_alpha == 2


def test_disable_lora_and_unwrap(make_llama, input_ids):
    base, model = make_llama(), make_llama()
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    randomise_b(model)
    with torch.no_grad():
        tuned = model(input_ids).logits
        with disable_lora(model):
            assert torch.equal(model(input_ids).logits, base(input_ids).logits)
        assert torch.equal(model(input_ids).logits, tuned)
        unwrap_lora(model)
        assert not list(lora_modules(model))
        assert set(model.state_dict()) == set(base.state_dict())
        assert (model(input_ids).logits - tuned).abs().max() < 1e-5


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_numerically(make_llama, input_ids, use_rslora):
    model = make_llama()
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=12, use_rslora=use_rslora)
    randomise_b(model)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    reference = peft.get_peft_model(make_llama(), config).eval()
    peft_state = reference.state_dict()
    with torch.no_grad():
        for key, t in lora_state_dict(model).items():
            peft_state[f"base_model.model.{key}.default.weight"].copy_(t)
        ours, theirs = model(input_ids).logits, reference(input_ids).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - make_llama()(input_ids).logits).abs().max() > 1e-4  # the adapter does something


def test_injection_keeps_the_models_eval_mode(make_llama, input_ids):
    model = make_llama()  # eval mode, as from_pretrained returns it
    inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.5)
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B, std=0.5)
    assert all(not m.training for _, m in lora_modules(model))
    with torch.no_grad():  # dropout off: two forwards agree exactly
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    model.train()
    assert all(m.training for _, m in lora_modules(model))


# --- tied output heads, Conv1D models, task heads ---


def test_tied_head_target_is_an_error_that_explains_the_tie(make_llama):
    model = make_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties its weight to the input embedding model.embed_tok"):
        inject_lora(model, ["q_proj", "lm_head"], r=2, lora_alpha=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not list(lora_modules(model))
    with pytest.raises(ValueError, match="untie_word_embeddings=true"):
        inject_lora(make_llama(tie_word_embeddings=True), r"lm_head", r=2, lora_alpha=4)
    inject_lora(make_llama(), ["lm_head"], r=2, lora_alpha=4)  # an untied head is a fine target


def test_untie_opt_in_keeps_the_input_side_and_merges_exactly(make_llama, input_ids, caplog):
    model = make_llama(tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight.clone()
    with caplog.at_level(logging.WARNING, logger="lorafit.lora"):
        inject_lora(model, ["q_proj", "lm_head"], r=2, lora_alpha=4, untie_embeddings=True)
    assert "Untied lm_head from model.embed_tokens" in caplog.text
    assert model.lm_head.base_layer.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    randomise_b(model)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merge_lora(model)
        merged = model(input_ids).logits
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input side is unchanged
    assert (merged - unmerged).abs().max() < 1e-5


def test_all_linear_on_gpt2_wraps_its_conv1d_layers_but_not_the_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    report = inject_lora(model, "all-linear", r=2, lora_alpha=4)
    assert [n for n, *_ in report.modules] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]  # more in tests/test_variants.py


def test_modules_to_save_take_precedence_over_targets(make_llama):
    from transformers import LlamaForSequenceClassification

    model = make_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)
    with pytest.raises(ValueError, match=r"heads trained whole \['score'\] removes every target"):
        inject_lora(model, ["score"], r=2, lora_alpha=4, modules_to_save=["score"])
    report = inject_lora(model, r".*(q_proj|score)", r=2, lora_alpha=4, modules_to_save=["score"])
    assert [n for n, *_ in report.modules] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]


@pytest.mark.parametrize("value", ["false", 0, None])
def test_use_rslora_must_be_a_bool(make_llama, value):
    with pytest.raises(ValueError, match="lora.use_rslora must be true or false"):
        inject_lora(make_llama(), ATTN, r=4, lora_alpha=8, use_rslora=value)
