"""A task's new classification head trains whole, with no LoRA inside, and round-trips in PEFT.

Tiny RoBERTa (head = `classifier.dense` + `classifier.out_proj`), DistilBERT (`pre_classifier` +
`classifier`, both new) and a Llama with a `score` head, as `lorafit.train.build` sets them up:
the task's head names go to injection as `modules_to_save`, then those modules train whole.
"""

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from conftest import TINY_LLAMA
from lorafit.adapters import load_adapter, save_adapter
from lorafit.lora import LoRAConfig, lora_modules
from lorafit.tasks.classification import ClassificationModule

BERT_TARGETS = ["query", "key", "value", "dense"]  # conf/lora/bert.yaml


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "roberta":
        cfg = RobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            vocab_size=100, max_position_embeddings=64, num_labels=3,
        )  # fmt: skip
        return RobertaForSequenceClassification(cfg).eval()
    if arch == "distilbert":
        cfg = DistilBertConfig(
            dim=32, hidden_dim=37, n_layers=1, n_heads=2, vocab_size=100,
            max_position_embeddings=64, num_labels=3,
        )  # fmt: skip
        return DistilBertForSequenceClassification(cfg).eval()
    cfg = LlamaConfig(**{**TINY_LLAMA, "vocab_size": 100}, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def build_like_train(arch: str, targets) -> tuple[nn.Module, list[str]]:
    """What `lorafit.train.build` does: inject with the task's heads excluded, heads trainable."""
    model = make(arch)
    heads = ClassificationModule.head_names(model)
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets).inject(
        model, modules_to_save=heads
    )
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter and head, so the round trip is not trivial
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B, std=0.05)
        for name in heads:
            for p in model.get_submodule(name).parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model, heads


CASES = [
    ("roberta", BERT_TARGETS, ["classifier"]),
    ("roberta", "all-linear", ["classifier"]),
    ("distilbert", "all-linear", ["pre_classifier", "classifier"]),
    ("llama", "all-linear", ["score"]),
    ("llama", ["q_proj", "v_proj", "score"], ["score"]),
]


@pytest.mark.parametrize("arch, targets, heads", CASES)
def test_heads_train_whole_without_lora_and_round_trip_in_peft(arch, targets, heads, tmp_path):
    model, found = build_like_train(arch, targets)
    assert sorted(found) == sorted(heads)  # DistilBERT's new pre_classifier is a head too
    assert not [n for n, _ in lora_modules(model) if n.split(".")[0] in heads]  # none in a head
    head_params = [p for h in heads for p in model.get_submodule(h).parameters()]
    assert head_params and all(p.requires_grad for p in head_params)
    save_adapter(
        model, tmp_path, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
        use_rslora=False, base_model_name_or_path=None, task_type="SEQ_CLS",
        modules_to_save=[h.rsplit(".", 1)[-1] for h in found],
    )  # fmt: skip
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert not [k for k in keys if "lora" in k and any(f".{h}." in k for h in heads)]
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 60, 2]])
    reference = peft.PeftModel.from_pretrained(make(arch), tmp_path).eval()
    loaded = make(arch)
    load_adapter(loaded, tmp_path)
    with torch.no_grad():
        ours, theirs, back = model(ids).logits, reference(input_ids=ids).logits, loaded(ids).logits
        plain = make(arch)(ids).logits
    assert (ours - theirs).abs().max() < 1e-5 and (ours - back).abs().max() < 1e-6
    assert (ours - plain).abs().max() > 1e-3
