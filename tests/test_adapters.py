"""Adapter folders: lorafit <-> PEFT round trips on tiny random Llamas, and load errors."""

import json
import logging
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForSequenceClassification

from lorafit.adapters import load_adapter, read_adapter_config, save_adapter
from lorafit.lora import disable_lora, inject_lora, lora_modules, lora_state_dict

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(model: nn.Module, targets=ATTN, **kwargs) -> nn.Module:
    """``model`` with LoRA and random lora_B (so the adapter changes the output)."""
    inject_lora(
        model, targets, r=kwargs.pop("r", 4), lora_alpha=kwargs.pop("lora_alpha", 8), **kwargs
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.02)
    return model


def save(model, path, targets=ATTN, **kwargs):
    defaults = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        use_rslora=False,
        base_model_name_or_path="tiny-llama",
    )
    return save_adapter(model, path, **{**defaults, **kwargs})


def max_diff(a: nn.Module, b: nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(input_ids).logits - b(input_ids).logits).abs().max().item()


def test_save_writes_peft_layout(make_llama, tmp_path):
    model = lora_model(make_llama())
    out = save(
        model,
        tmp_path / "run" / "adapter",
        extra={"seed": 3},
        base_model_name_or_path=tmp_path / "base",
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafit.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ATTN
    assert "lorafit" not in config and "rank_pattern" not in config  # PEFT default: not written
    assert read_adapter_config(out)["lorafit"] == {"seed": 3}
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 64) and len(tensors) == 2 * 4 * 2
    # Saving again over the folder replaces the files and leaves no temp files behind.
    save(model, out, extra={"seed": 4})
    assert read_adapter_config(out)["lorafit"] == {"seed": 4}
    assert len(list(out.iterdir())) == 3 and len(list(out.parent.iterdir())) == 1


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lorafit_adapter_loads_in_peft(make_llama, input_ids, tmp_path, use_rslora):
    model = lora_model(make_llama(), use_rslora=use_rslora)
    save(model, tmp_path, use_rslora=use_rslora)
    reference = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    assert max_diff(model, reference, input_ids) < 1e-4
    assert max_diff(model, make_llama(), input_ids) > 1e-4


def test_older_layout_with_metadata_inside_the_config_still_loads(make_llama, input_ids, tmp_path):
    model = lora_model(make_llama())
    save(model, tmp_path, extra={"seed": 3})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lorafit": {"seed": 2}}))
    (tmp_path / "lorafit.json").unlink()
    assert read_adapter_config(tmp_path)["lorafit"] == {"seed": 2}
    loaded = make_llama()
    load_adapter(loaded, tmp_path)
    assert max_diff(model.eval(), loaded.eval(), input_ids) < 1e-6
    (tmp_path / "lorafit.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"lorafit.json is not valid JSON"):
        read_adapter_config(tmp_path)


def test_peft_reads_the_config_without_warnings(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path, extra={"seed": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on keys it does not know ("upgrade PEFT")
        config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.r == 4 and set(config.target_modules) == set(ATTN)


def test_all_linear_and_patterns_load_in_peft(make_llama, input_ids, tmp_path):
    model = lora_model(
        make_llama(),
        "all-linear",
        exclude_modules=["model.layers.0.mlp.up_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.mlp\.down_proj": 3},
    )
    save(model, tmp_path, "all-linear", exclude_modules=["model.layers.0.mlp.up_proj"])
    config = read_adapter_config(tmp_path)
    assert len(config["target_modules"]) == 13 and "lm_head" not in config["target_modules"]
    assert config["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.v_proj": 2 for i in (0, 1)}
    assert config["alpha_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 3}
    reference = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    assert max_diff(model, reference, input_ids) < 1e-4
    loaded = make_llama()
    load_adapter(loaded, tmp_path)
    assert max_diff(model, loaded, input_ids) == 0


def test_save_writes_full_names_when_targets_do_not_fit(make_llama, input_ids, tmp_path, caplog):
    model = lora_model(make_llama(), ATTN, exclude_modules=["o_proj"])
    with caplog.at_level(logging.WARNING, logger="lorafit.adapters"):
        save(model, tmp_path)  # exclude_modules forgotten: PEFT would also adapt o_proj
    assert "does not describe the model's LoRA layers" in caplog.text
    names = read_adapter_config(tmp_path)["target_modules"]
    assert names == [n for n, _ in lora_modules(model)] and len(names) == 6
    reference = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    assert max_diff(model, reference, input_ids) < 1e-4


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_lorafit(make_llama, input_ids, tmp_path, use_rslora, caplog):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    reference = peft.get_peft_model(make_llama(), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    reference.save_pretrained(tmp_path)
    model = make_llama()
    with caplog.at_level(logging.WARNING, logger="lorafit.adapters"):
        loaded = load_adapter(model, tmp_path)
    assert not caplog.text  # every field PEFT writes is one lorafit knows
    assert loaded["r"] == 4 and loaded["use_rslora"] is use_rslora
    assert len(lora_state_dict(model)) == 2 * 3 * 2
    assert max_diff(model, reference.eval(), input_ids) < 1e-4


def test_peft_all_linear_adapter_loads_in_lorafit(make_llama, input_ids, tmp_path):
    reference = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    reference.save_pretrained(tmp_path)
    model = make_llama()
    load_adapter(model, tmp_path)
    assert len(list(lora_modules(model))) == 14
    assert max_diff(model, reference.eval(), input_ids) < 1e-4


def test_modules_to_save_round_trip(make_llama, input_ids, tmp_path):
    def make():
        return make_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)

    model = make()
    inject_lora(model, ATTN, r=4, lora_alpha=8)
    model.score.weight.requires_grad_(True)
    with torch.no_grad():
        model.score.weight.mul_(2.0)
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.02)
    save(model, tmp_path, task_type="SEQ_CLS", modules_to_save=["score"])
    assert "base_model.model.score.weight" in load_file(tmp_path / "adapter_model.safetensors")
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert max_diff(model, reference, input_ids) < 1e-4
    loaded = make()
    load_adapter(loaded, tmp_path)
    assert max_diff(model, loaded, input_ids) == 0


def test_shape_mismatch_names_key_and_shapes(make_llama, tmp_path):
    save(lora_model(make_llama(hidden_size=32)), tmp_path)
    model = make_llama()
    with pytest.raises(ValueError) as err:
        load_adapter(model, tmp_path)
    msg = str(err.value)
    assert "'model.layers.0.self_attn.q_proj.lora_A'" in msg
    assert "shape (4, 32)" in msg and "expects (4, 64)" in msg and "another base model" in msg
    # The failed load leaves the model as it was: no LoRA layers, parameters trainable again.
    assert not list(lora_modules(model)) and all(p.requires_grad for p in model.parameters())


def test_missing_config(make_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_llama(), tmp_path)


def test_missing_weights(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(make_llama(), tmp_path)


def test_wrong_peft_type(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="'peft_type' is 'IA3'"):
        load_adapter(make_llama(), tmp_path)


def test_unsupported_peft_feature(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_bias": True}))
    with pytest.raises(NotImplementedError, match="lora_bias=True"):
        load_adapter(make_llama(), tmp_path)


def test_corrupt_weights(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors"):
        load_adapter(make_llama(), tmp_path)


def test_missing_tensor(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path, target_modules=ATTN)
    path = tmp_path / "adapter_config.json"
    config = {**json.loads(path.read_text()), "target_modules": ATTN + ["up_proj"]}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="4 LoRA tensors missing"):
        load_adapter(make_llama(), tmp_path)


def peft_model_with_random_b(base: nn.Module, config: peft.LoraConfig, seed: int = 2):
    reference = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    return reference


def test_peft_patterns_and_modules_to_save_load_in_lorafit(make_llama, input_ids, tmp_path):
    def make():
        return make_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
        task_type="SEQ_CLS",  # PEFT adds the "score" head to modules_to_save
    )
    reference = peft_model_with_random_b(make(), config)
    with torch.no_grad():
        reference.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)
    reference.save_pretrained(tmp_path)
    loaded = make()
    load_adapter(loaded, tmp_path)
    ranks = {n: m.r for n, m in lora_modules(loaded)}
    assert (
        ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"]
    )
    assert dict(lora_modules(loaded))["model.layers.1.self_attn.q_proj"].scaling == 8.0
    assert max_diff(loaded, reference.eval(), input_ids) < 1e-4
    assert max_diff(loaded, make(), input_ids) > 1e-3  # the head and the LoRA layers matter


def test_rank_mismatch_is_named(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(ValueError, match=r"Only the rank differs \(4 in the weights, 8 from"):
        load_adapter(make_llama(), tmp_path)


# --- several adapters on one base (lorafit.multi) against PEFT's multi-adapter model ---


def two_peft_adapters(make_llama, tmp_path, r_b=4):
    """Two adapters written by PEFT: q,v at r=4 and v,up at ``r_b`` (rsLoRA)."""
    a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft.LoraConfig(r=r_b, lora_alpha=4, target_modules=["v_proj", "up_proj"], use_rslora=True)
    peft_model_with_random_b(make_llama(), a, seed=3).save_pretrained(tmp_path / "a")
    peft_model_with_random_b(make_llama(), b, seed=4).save_pretrained(tmp_path / "b")
    reference = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "a", adapter_name="a")
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    return tmp_path / "a", tmp_path / "b", reference.eval()


def test_adapter_set_switches_and_disables_like_peft(make_llama, input_ids, tmp_path):
    from lorafit.multi import AdapterSet

    dir_a, dir_b, reference = two_peft_adapters(make_llama, tmp_path)
    model = make_llama()
    bank = AdapterSet(model)
    bank.load("a", dir_a)
    bank.load("b", dir_b)
    assert bank.active == "a" and len(list(lora_modules(model))) == 6  # q, v, up on 2 layers
    for name in ["a", "b", "a"]:
        bank.set_active(name)
        reference.set_adapter(name)
        assert max_diff(model, reference, input_ids) < 1e-5
    with bank.disabled(), reference.disable_adapter():
        assert max_diff(model, reference, input_ids) < 1e-5
        assert max_diff(model, make_llama(), input_ids) == 0
    assert max_diff(model, reference, input_ids) < 1e-5  # "a" again after the block
    save(lora_model(make_llama(hidden_size=32)), tmp_path / "other_base")
    with pytest.raises(ValueError, match="has shape"):
        bank.load("c", tmp_path / "other_base")
    assert max_diff(model, reference, input_ids) < 1e-5 and sorted(bank.adapters) == ["a", "b"]
    with pytest.raises(KeyError, match="No adapter named 'c'"):
        bank.set_active("c")


@pytest.mark.parametrize("r_b, combination", [(4, "linear"), (4, "cat"), (2, "cat")])
def test_weighted_combination_matches_peft(make_llama, input_ids, tmp_path, r_b, combination):
    from lorafit.multi import AdapterSet

    dir_a, dir_b, reference = two_peft_adapters(make_llama, tmp_path, r_b=r_b)
    reference.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type=combination)
    reference.set_adapter("ab")
    model = make_llama()
    bank = AdapterSet(model)
    bank.load("a", dir_a)
    bank.load("b", dir_b)
    assert bank.add_weighted("ab", ["a", "b"], [0.7, -0.4], combination) == combination
    bank.set_active("ab")
    assert max_diff(model, reference, input_ids) < 1e-5
    bank.set_active("a")
    assert max_diff(model, reference, input_ids) > 1e-4
    # The combination saves as a PEFT folder that both libraries load back to the same logits.
    bank.save("ab", tmp_path / "ab")
    again = make_llama()
    load_adapter(again, tmp_path / "ab")
    assert max_diff(again, reference, input_ids) < 1e-5
    assert (
        max_diff(
            peft.PeftModel.from_pretrained(make_llama(), tmp_path / "ab"), reference, input_ids
        )
        < 1e-5
    )


def test_linear_needs_one_rank(make_llama, tmp_path):
    from lorafit.multi import AdapterSet

    dir_a, dir_b, _ = two_peft_adapters(make_llama, tmp_path, r_b=2)
    bank = AdapterSet(make_llama())
    bank.load("a", dir_a)
    bank.load("b", dir_b)
    with pytest.raises(ValueError, match=r"found ranks \[2, 4\]; use 'cat'"):
        bank.add_weighted("ab", ["a", "b"], [0.5, 0.5], "linear")
    assert bank.add_weighted("ab", ["a", "b"], [0.5, 0.5]) == "cat"  # the default when ranks differ


# --- the built-in real model: lorafit <-> PEFT round trips ---


@pytest.mark.slow
def test_round_trip_on_builtin_model(smol_dir, smol_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()

    ids = smol_tokenizer(["The capital of France is Paris, and"], return_tensors="pt").input_ids
    ours = lora_model(base(), r=8, lora_alpha=16)
    save(ours, tmp_path / "ours", r=8, lora_alpha=16, base_model_name_or_path=smol_dir)
    in_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert max_diff(ours, in_peft, ids) < 1e-4  # lorafit -> PEFT
    del ours
    in_peft.save_pretrained(tmp_path / "peft")
    back = base()
    load_adapter(back, tmp_path / "peft")
    assert max_diff(back, in_peft, ids) < 1e-4  # PEFT -> lorafit
    with torch.no_grad():
        with disable_lora(back):
            plain = back(ids).logits
        assert (back(ids).logits - plain).abs().max() > 1e-3  # the adapter changes the logits


# --- adapter_config.json read strictly, written for old PEFT releases too ---

# Every field PEFT 0.12.0's LoraConfig accepts (peft/tuners/lora/config.py + peft/config.py of the
# 0.12.0 wheel): PEFT 0.12/0.13 refuse a config with any other key ("unexpected keyword argument").
PEFT_0_12_KEYS = {
    "base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode",
    "auto_mapping", "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "use_dora",
    "layer_replication", "runtime_config",
}  # fmt: skip


def edit_config(path, **fields):
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **fields}))


@pytest.mark.parametrize(
    "field, value",
    [("use_rslora", "false"), ("r", "4"), ("r", 4.0), ("lora_alpha", True), ("lora_dropout", "0"),
     ("target_modules", 3), ("rank_pattern", {"v_proj": "2"}), ("modules_to_save", "score"),
     ("use_dora", "false")],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_an_error_naming_file_and_field(
    make_llama, tmp_path, field, value
):
    save(lora_model(make_llama()), tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: field '{field}' must be "):
        load_adapter(make_llama(), tmp_path)


@pytest.mark.parametrize(
    "fields",
    [{"ensure_weight_tying": True}, {"arrow_config": {"top_k": 3}}, {"use_qalora": True},
     {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}, {"lora_bias": True},
     {"trainable_token_indices": [1, 2]}, {"megatron_config": {"tp": 2}}],
)  # fmt: skip
def test_fields_lorafit_cannot_honour_are_refused(make_llama, tmp_path, fields):
    save(lora_model(make_llama()), tmp_path)
    edit_config(tmp_path, **fields)
    key = next(iter(fields))
    with pytest.raises(NotImplementedError, match=rf"adapter_config.json: {key}="):
        load_adapter(make_llama(), tmp_path)


def test_harmless_and_unknown_fields(make_llama, input_ids, tmp_path, caplog):
    model = lora_model(make_llama())
    save(model, tmp_path)
    harmless = {"init_lora_weights": "gaussian", "peft_version": "0.21.2", "runtime_config": {}}
    edit_config(tmp_path, **harmless, new_feature=None, newer_feature={"k": 3})
    loaded = make_llama()
    with caplog.at_level(logging.WARNING, logger="lorafit.adapters"):
        load_adapter(loaded, tmp_path)
    assert "does not know the field(s) newer_feature={'k': 3}" in caplog.text
    assert "new_feature=" not in caplog.text and "init_lora_weights" not in caplog.text
    assert max_diff(model, loaded, input_ids) == 0


def test_effective_scaling_is_logged_per_layer_group(make_llama, tmp_path, caplog):
    model = lora_model(make_llama(), use_rslora=True, rank_pattern={"v_proj": 2})
    save(model, tmp_path, use_rslora=True)
    with caplog.at_level(logging.INFO, logger="lorafit.adapters"):
        load_adapter(make_llama(), tmp_path)
    assert "8 LoRA layers; effective scaling lora_alpha/sqrt(r)" in caplog.text
    assert "8/sqrt(4) = 4 on 6 layer(s); 8/sqrt(2) = 5.65685 on 2 layer(s)" in caplog.text
    edit_config(tmp_path, use_rslora=False)  # the string "false" is refused, a real false is not
    with caplog.at_level(logging.INFO, logger="lorafit.adapters"):
        load_adapter(make_llama(), tmp_path)
    assert "lora_alpha/r = 8/4 = 2 on 6 layer(s); 8/2 = 4 on 2 layer(s)" in caplog.text


def test_written_config_has_only_non_default_keys_old_peft_knows(make_llama, input_ids, tmp_path):
    def make():
        return make_llama(cls=LlamaForSequenceClassification, num_labels=3, pad_token_id=0)

    model = lora_model(
        make(), "all-linear", exclude_modules=["model.layers.0.mlp.up_proj"],
        rank_pattern={"v_proj": 2}, use_rslora=True, modules_to_save=["score"],
    )  # fmt: skip
    model.score.weight.requires_grad_(True)
    with torch.no_grad():
        model.score.weight.mul_(2.0)
    save(model, tmp_path, "all-linear", use_rslora=True, lora_dropout=0.1, task_type="SEQ_CLS",
         exclude_modules=["model.layers.0.mlp.up_proj"], modules_to_save=["score"])  # fmt: skip
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= PEFT_0_12_KEYS, set(config) - PEFT_0_12_KEYS
    assert None not in config.values() and "exclude_modules" not in config
    assert config["use_rslora"] is True and config["lora_dropout"] == 0.1
    assert "bias" not in config and "init_lora_weights" not in config  # PEFT's defaults
    minimal = save(lora_model(make_llama()), tmp_path / "minimal", base_model_name_or_path=None)
    assert set(json.loads((minimal / "adapter_config.json").read_text())) == {
        "peft_type", "task_type", "r", "lora_alpha", "target_modules", "inference_mode",
    }  # fmt: skip
    reference = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert max_diff(model.eval(), reference, input_ids) < 1e-4
    assert max_diff(model, make(), input_ids) > 1e-3


def test_a_loaded_adapter_is_frozen_unless_asked(make_llama, tmp_path):
    save(lora_model(make_llama()), tmp_path)
    model = make_llama()
    load_adapter(model, tmp_path)
    assert list(lora_modules(model)) and not any(p.requires_grad for p in model.parameters())
    model = make_llama()
    load_adapter(model, tmp_path, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
