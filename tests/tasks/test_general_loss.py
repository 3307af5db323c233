"""Forgetting, measured: the general-text loss is transformers' own causal-LM loss on a fixed
document sample, the same sample in every run, and off where it does not apply."""

import types

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision, Precision
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.data.formats import DataError
from lorafit.data.general import general_batches, general_texts
from lorafit.tasks.general import GeneralLoss, general_loss
from tiny_runs import TINY

TRAINER = types.SimpleNamespace(precision_plugin=None)


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=len(tokenizer)))


def test_the_bbc_sample_is_fixed_distinct_and_mixes_topics():
    first, again = general_texts("bbc_news", 200), general_texts("bbc_news", 200)
    assert first == again and len(set(first)) == 200
    # sorted paths put the topics in blocks (business ... tech); the sample spans all of them
    everything = general_texts("bbc_news", 10_000)
    assert len(everything) == 2127  # 2,225 articles less 98 exact copies
    at = [everything.index(t) for t in first]
    assert at == sorted(at) and at[0] < 100 and at[-1] > 2000
    with pytest.raises(DataError, match="eval.general_docs"):
        general_texts("bbc_news", 0)


def test_general_loss_is_the_token_mean_causal_lm_loss(smol_tokenizer, tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("The cat sat on the mat.\nRates rose by a quarter point.\nShort.\n\n")
    probe = GeneralLoss(str(text), 3, 12, batch_size=2, tokenizer=smol_tokenizer)
    model = tiny_model(smol_tokenizer).train()
    got = probe.loss(model)
    assert all(m.training for m in model.modules())  # its mode is given back
    # transformers' own loss over the same three texts at once (mean over all real tokens)
    (batch,) = general_batches(
        smol_tokenizer, general_texts(str(text), 3), max_tokens=12, batch_size=3
    )
    assert int(batch["attention_mask"].sum()) > 3 * 2  # padding present: the short text
    with torch.no_grad():
        ref = model.eval()(**batch).loss  # labels: the ids, -100 at padding
    assert got == pytest.approx(float(ref), rel=1e-5)


def test_it_is_off_for_null_text_and_other_tasks_and_on_in_the_trainers_precision(
    smol_tokenizer,
):
    model = tiny_model(smol_tokenizer)
    assert GeneralLoss(None, tokenizer=smol_tokenizer)(TRAINER, model) == {}
    assert GeneralLoss(task="classification", tokenizer=smol_tokenizer)(TRAINER, model) == {}
    assert general_loss(None, "causal_lm", smol_tokenizer)(TRAINER, model) == {}
    probe = GeneralLoss(general_docs=2, general_max_tokens=8, tokenizer=smol_tokenizer)
    plain = probe(types.SimpleNamespace(precision_plugin=Precision()), model)["general_loss"]
    bf16 = probe(types.SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu")), model)
    assert plain == pytest.approx(probe.loss(model), rel=1e-6)
    assert bf16["general_loss"] != plain and bf16["general_loss"] == pytest.approx(plain, rel=0.02)


def test_a_typo_in_the_eval_node_is_a_named_error(tmp_path):
    from lorafit.train import validate
    from tiny_runs import compose_run

    cfg = compose_run(tmp_path, ["+eval.general_txt=notes.txt"])
    with pytest.raises(ValueError, match=r"eval\.general_txt \(did you mean eval\.general_text\?"):
        validate(cfg)
