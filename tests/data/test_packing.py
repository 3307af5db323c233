"""Packing (`data.packing`): a micro-batch's examples end to end in few rows, attention kept inside
each example, and the loss and gradients of the padded batch, on the built-in conversations."""

import pytest
import torch
from torch import nn

from lorafit.data.encoding import IGNORE_INDEX, lm_collator
from lorafit.data.lm import ChatDataModule
from lorafit.data.packing import first_fit_decreasing, model_inputs, pack_batch, pack_rows
from lorafit.lora import LoRAConfig, lora_modules
from lorafit.tasks.causal_lm import causal_lm_loss, supervised_tokens

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def chats(smol_tokenizer):
    """96 built-in conversations, packed training batches of 8."""
    dm = ChatDataModule(
        smol_tokenizer, max_train_examples=96, batch_size=8, num_samples=0, packing=True
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def examples(chats):
    """8 real conversations of 8 different lengths, shortest to longest."""
    by_length = {n: i for i, n in enumerate(chats.train_lengths)}
    lengths = sorted(by_length)
    picked = [lengths[round(k * (len(lengths) - 1) / 7)] for k in range(8)]
    assert len(set(picked)) == 8
    return [chats.train_set[by_length[n]] for n in picked]


def segments(batch: dict) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) of every example in a packed batch, row by row."""
    out = []
    rows = (batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids"))
    for ids, labels, mask, pos in zip(*rows, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then padding
        starts = [int(s) for s in (pos[:n] == 0).nonzero()] + [n]
        out += [
            (ids[a:b].tolist(), labels[a:b].tolist())
            for a, b in zip(starts, starts[1:], strict=False)
        ]
    return out


def test_rows_are_few_and_even():
    lengths = [5, 3, 7, 2, 6]
    assert first_fit_decreasing(lengths, 10) == [[2, 1], [4, 3], [0]]  # 10, 8, 5 tokens
    assert pack_rows(lengths, 10) == [[2], [4, 3], [0, 1]]  # the same 3 rows, 7, 8, 8 tokens
    assert pack_rows([6, 6, 4, 4], 10) == [[0, 2], [1, 3]]
    # Spread evenly, 3 + 2 + 2 would overflow a row of 6: first fit's rows
    assert pack_rows([3, 3, 2, 2, 2], 6) == [[0, 1], [2, 3, 4]]


def test_each_example_once_in_rows_of_max_length(examples, smol_tokenizer):
    batch = pack_batch(examples, max_length=MAX_LENGTH, pad_id=smol_tokenizer.pad_token_id)
    rows, width = batch["input_ids"].shape
    assert rows < len(examples) and width % 8 == 0
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (rows, width) for t in batch.values())
    assert int(batch["attention_mask"].sum(1).max()) <= MAX_LENGTH
    assert int(batch["attention_mask"].sum()) == sum(len(e["input_ids"]) for e in examples)
    found = segments(batch)
    want = sorted(e["input_ids"] for e in examples)
    assert sorted(ids for ids, _ in found) == want  # every example, whole, exactly once
    for ids, labels in found:
        ex = next(e for e in examples if e["input_ids"] == ids)
        assert labels == [IGNORE_INDEX, *ex["labels"][1:]]  # no target for a first token
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == smol_tokenizer.pad_token_id).all()
    assert supervised_tokens(batch["labels"]) == supervised_tokens(
        lm_collator(smol_tokenizer)(examples)["labels"]
    )


def test_no_example_learns_the_next_ones_first_token():
    """Every token labelled (`train_on_prompt`, text chunks): each example's first label is
    -100 in the packed row, as the shifted loss never reads it unpacked."""
    examples = [{"input_ids": [7] * n, "labels": [7] * n} for n in (5, 3, 2)]
    batch = pack_batch(examples, max_length=10, pad_id=0)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["position_ids"][0, :10].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert batch["labels"][0, :10].tolist() == [-100, 7, 7, 7, 7, -100, 7, 7, -100, 7]
    assert batch["position_ids"][0, 10:].tolist() == list(range(6))  # padding: a segment
    assert supervised_tokens(batch["labels"]) == sum(n - 1 for n in (5, 3, 2))


@pytest.mark.parametrize(
    "attention, labelled", [("sdpa", "answers"), ("eager", "answers"), ("sdpa", "all")]
)
def test_packed_loss_and_gradients_equal_padded(
    attention, labelled, examples, make_llama, smol_tokenizer
):
    """Float32: the summed loss over supervised tokens and the LoRA gradients of its mean, from
    padded rows and from packed ones (both in float rounding of each other); labels on the
    answers (the default), or on every token (`train_on_prompt`)."""
    if labelled == "all":
        examples = [dict(e, labels=e["input_ids"]) for e in examples]
    model = make_llama(vocab_size=len(smol_tokenizer), attn_implementation=attention)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets).inject(model)
    torch.manual_seed(1)
    for _, layer in lora_modules(model):  # B = 0 would leave A without a gradient
        nn.init.normal_(layer.lora_B, std=0.05)
    model.train()
    padded = lm_collator(smol_tokenizer)(examples)
    packed = pack_batch(examples, max_length=MAX_LENGTH, pad_id=smol_tokenizer.pad_token_id)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        logits = model(**model_inputs(batch)).logits
        loss, n = causal_lm_loss(logits, batch["labels"], reduction="sum")
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), n, grads))
    (want, n_want, g_want), (got, n_got, g_got) = results
    assert n_got == n_want > 100
    assert abs(got / n_got - want / n_want) < 1e-4 and abs(got - want) < 1e-4 * n_want
    for k, g in g_want.items():  # within 1e-4 of each tensor's largest entry (1e-4 to 5e-2)
        assert (g_got[k] - g).abs().max() <= 1e-4 * g.abs().max() and g.abs().max() > 0, k


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_stays_inside_each_example(attention, examples, make_llama, smol_tokenizer):
    """The later example of a packed row has the logits it has alone, whatever the earlier
    example's tokens: attention across examples would change them."""
    model = make_llama(vocab_size=len(smol_tokenizer), attn_implementation=attention).train()
    first, second = examples[-1], examples[3]
    pad_id = smol_tokenizer.pad_token_id
    row = pack_batch([first, second], max_length=2 * MAX_LENGTH, pad_id=pad_id)
    assert row["input_ids"].shape[0] == 1  # one row: `first`, then `second`, then padding
    start, end = len(first["input_ids"]), len(first["input_ids"]) + len(second["input_ids"])
    changed = dict(first, input_ids=[(t + 7) % len(smol_tokenizer) for t in first["input_ids"]])
    other = pack_batch([changed, second], max_length=2 * MAX_LENGTH, pad_id=pad_id)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        packed = model(**model_inputs(row)).logits[0, start:end]
        after = model(**model_inputs(other)).logits[0, start:end]
        unpacked_first = model(input_ids=torch.tensor([first["input_ids"]])).logits[0]
        first_changes = (unpacked_first - model(**model_inputs(other)).logits[0, :start]).abs()
    assert (packed - alone).abs().max() < 1e-4
    assert (after - alone).abs().max() < 1e-4
    assert first_changes.max() > 1e-2  # the change is real: the first example's logits move


def test_packed_training_steps_hold_the_same_examples_in_fewer_rows(chats, smol_tokenizer):
    """A packed epoch of the built-in data: the sampler's examples, tokens and supervised counts
    step by step, in fewer rows and fewer padded positions."""
    packed_steps = list(chats.train_dataloader())
    chats.packing = False
    try:
        padded_steps = list(chats.train_dataloader())
    finally:
        chats.packing = True
    assert len(packed_steps) == len(padded_steps) == 12
    for packed, padded in zip(packed_steps, padded_steps, strict=True):
        assert packed["example_index"].tolist() == padded["example_index"].tolist()
        assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
        assert supervised_tokens(packed["labels"]) == supervised_tokens(padded["labels"])
        found = sorted(ids for ids, _ in segments(packed))
        assert found == sorted(
            chats.train_set[i]["input_ids"] for i in packed["example_index"].tolist()
        )
    rows = [sum(len(s["input_ids"]) for s in steps) for steps in (packed_steps, padded_steps)]
    slots = [sum(s["input_ids"].numel() for s in steps) for steps in (packed_steps, padded_steps)]
    assert rows[0] < rows[1] == 96 and slots[0] < slots[1]


def test_validation_batches_stay_padded(chats):
    batch = next(iter(chats.val_dataloader()))
    assert "position_ids" not in batch
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}
