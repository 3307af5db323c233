"""The chunked, supervised-positions-only loss equals the whole-logits loss, in value and gradient;
gradient checkpointing on a frozen base trains the same LoRA gradients; a bf16 base keeps a
float32 adapter."""

import pytest
import torch

from lorafit.data.encoding import IGNORE_INDEX
from lorafit.lora import LoRAConfig, lora_modules
from lorafit.tasks.lm_loss import (
    FrozenHeadCrossEntropy,
    causal_lm_loss,
    split_head,
    supervised_loss,
)


def batch(vocab: int = 128, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # prompts
    labels[1, 9:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask}, labels


def lora_grads(model, inputs, labels, chunk):
    model.zero_grad()
    loss = supervised_loss(model, inputs, labels, chunk)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_loss_and_gradients_equal_whole_logits(make_llama, chunk):
    model = make_llama()
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0).inject(model)
    for _, m in lora_modules(model):  # B != 0: the LoRA path changes the output
        torch.nn.init.normal_(m.lora_B, std=0.1)
    inputs, labels = batch()
    whole, g_whole = lora_grads(model, inputs, labels, None)
    ours, g_ours = lora_grads(model, inputs, labels, chunk)
    assert torch.allclose(ours, whole, rtol=1e-5, atol=1e-5)
    assert g_whole.keys() == g_ours.keys() and len(g_whole) > 0
    for name in g_whole:
        assert torch.allclose(g_ours[name], g_whole[name], rtol=1e-4, atol=1e-6), name


def test_frozen_head_path_is_the_fused_function(make_llama, monkeypatch):
    model = make_llama()
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0).inject(model)
    calls = []
    original = FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(FrozenHeadCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a))
    inputs, labels = batch()
    supervised_loss(model, inputs, labels, 5).backward()
    assert calls == [1]


def test_trainable_head_gets_its_gradient_through_checkpointed_chunks(make_llama):
    model = make_llama(tie_word_embeddings=False)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    inputs, labels = batch()
    whole, g_whole = lora_grads(model, inputs, labels, None)
    ours, g_ours = lora_grads(model, inputs, labels, 4)
    assert torch.allclose(ours, whole, rtol=1e-5)
    assert torch.allclose(g_ours["lm_head.weight"], g_whole["lm_head.weight"], atol=1e-6)


def test_loss_matches_the_models_own_label_loss(make_llama):
    model = make_llama()
    inputs, labels = batch()
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        ours = supervised_loss(model, inputs, labels, 7) / n
        theirs = model(**inputs, labels=labels).loss
        whole, _ = causal_lm_loss(model(**inputs).logits, labels)
    assert torch.allclose(ours, theirs, rtol=1e-5) and torch.allclose(ours, whole, rtol=1e-5)


def test_a_model_with_a_logit_softcap_takes_the_whole_logits_path(make_llama):
    model = make_llama()
    assert split_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None


def test_gradient_checkpointing_on_a_frozen_base_trains_the_same_gradients(make_llama):
    """No "element 0 of tensors does not require grad": non-reentrant checkpointing."""
    model = make_llama()
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0).inject(model)
    model.train()
    inputs, labels = batch()
    plain, g_plain = lora_grads(model, inputs, labels, 1024)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    ckpt, g_ckpt = lora_grads(model, inputs, labels, 1024)
    assert torch.allclose(ckpt, plain)
    for name in g_plain:
        assert torch.allclose(g_ckpt[name], g_plain[name], atol=1e-6), name


def test_load_model_turns_gradient_checkpointing_on(tmp_path, make_llama):
    from lorafit.models import ModelConfig, load_model

    make_llama().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), ModelConfig(gradient_checkpointing=True))
    assert model.model.gradient_checkpointing and model.training is False


def test_bf16_base_keeps_a_float32_adapter(make_llama):
    model = make_llama().to(torch.bfloat16)
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0).inject(model)
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    inputs, labels = batch()
    loss = supervised_loss(model, inputs, labels, 1024)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_trainer_compile_compiles_each_decoder_block_in_place(make_llama):
    from lorafit.distributed import compile_layers

    model = make_llama()
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0).inject(model)
    names = sorted(model.state_dict())
    assert compile_layers(model, False) == 0
    assert compile_layers(model, True) == len(model.model.layers) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert sorted(model.state_dict()) == names  # adapters save and load by the same keys
