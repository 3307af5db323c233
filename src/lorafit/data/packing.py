"""Padding-free packing: a micro-batch's examples laid end to end in as few rows as fit.

`StepSampler` already groups examples of similar length, so an unpacked micro-batch pads little;
but chat examples are mostly far shorter than `max_length`, and packing puts several of them in
one row. The examples of a micro-batch stay exactly the ones the sampler chose: packing changes
rows, never which examples a step holds, so the step's loss and its supervised count are those of
the unpacked batch (to float rounding).

A packed row keeps its examples apart by `position_ids` that restart at 0 for each example, from
which transformers builds a block-diagonal causal mask (`model_inputs`): every token sees only
the earlier tokens of its own example, at the positions (RoPE) it has unpacked.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lorafit.data.encoding import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens: longest first, each
    into the first row with room for it (first-fit decreasing; ties keep their order)."""
    rows: list[list[int]] = []
    room: list[int] = []  # tokens still free in each row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in as few rows of at most `capacity` tokens as `first_fit_decreasing`
    finds, spread evenly over that many rows (longest first, each into the emptiest row); the
    first-fit rows when spreading overflows one.

    Every row is padded to the longest, and first fit fills the first rows to `capacity` and
    leaves the last one short: with 8 examples a micro-batch, that is most of its padding.
    """
    rows = first_fit_decreasing(lengths, capacity)
    spread: list[list[int]] = [[] for _ in rows]
    fill = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = fill.index(min(fill))
        spread[r].append(i)
        fill[r] += lengths[i]
    return spread if max(fill, default=0) <= capacity else rows


def pack_batch(
    examples: list[dict[str, Any]], max_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Pack `{"input_ids", "labels"}` examples into R rows of at most `max_length` tokens
    (`pack_rows`), each example whole and once.

    Args:
        examples: the micro-batch, each with equally long `input_ids` and `labels` lists.
        max_length: tokens per row (no example is longer: encoding truncates to it).
        pad_id: token id on padding positions.

    Returns:
        (R, L) long tensors, L the longest row rounded up to a multiple of 8 (as `lm_collator`):
        `input_ids` (`pad_id` on padding); `labels`, -100 on padding and on each example's first
        token (so no example's last token learns to predict the next example's first; unpacked,
        the shifted loss never reads that label either); `attention_mask`, 1 on real tokens and
        0 on padding (`attention_mask.sum()` counts real tokens, as unpacked); `position_ids`,
        0, 1, ... within each example, and again from 0 over a row's padding, which so forms a
        segment of its own that no real token attends to.

    Raises:
        ValueError: an example longer than `max_length`.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    if max(lengths, default=0) > max_length:
        raise ValueError(f"an example of {max(lengths)} tokens is longer than {max_length}")
    rows = pack_rows(lengths, max_length)
    width = -(-max(sum(lengths[i] for i in row) for row in rows) // 8) * 8
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            ids[r, start:end] = torch.tensor(examples[i]["input_ids"])
            labels[r, start + 1 : end] = torch.tensor(examples[i]["labels"][1:])
            mask[r, start:end] = 1
            positions[r, start:end] = torch.arange(lengths[i])
            start = end
        positions[r, start:] = torch.arange(width - start)  # padding: a segment of its own
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def packed_collator(tokenizer, max_length: int) -> partial:
    """A collate function (picklable, for DataLoader workers): examples -> `pack_batch` rows of
    at most `max_length` tokens, padded with the tokenizer's pad id (eos when it has none)."""
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    return partial(pack_batch, max_length=max_length, pad_id=pad_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments to call a transformers causal LM with on a batch, packed or not.

    Unpacked (no `position_ids`): `input_ids` and the (B, T) padding `attention_mask`.

    Packed: `input_ids` and `position_ids` (R, L), no attention mask, and `use_cache=False`.
    transformers (5.x, `masking_utils.create_causal_mask`) then finds the examples itself
    (`find_packed_sequence_indices`: a new segment wherever a position is not the previous plus
    one) and builds the block-diagonal causal mask for the model's attention: (R, 1, L, L) bool
    for SDPA, (R, 1, L, L) float for eager, a flex `BlockMask` for flex attention. It does so
    only when the 2D mask is None and there is no cache, and the model makes a `DynamicCache`
    whenever `use_cache` is on (Llama's config default, in training too), so `use_cache=False`
    is what keeps attention inside each example. A 4D mask of our own would be passed through
    unchanged, so it would have to be in the form of each attention implementation (bool or
    additive float); transformers' own path is right for all of them. Padding at the end of a
    row is a segment of its own (`pack_batch`): real tokens never attend to it, and its outputs
    carry no label.

    Flash attention (which lorafit does not configure) takes packed examples from
    `position_ids` only in a single flattened row (batch size 1); with R > 1 rows it would attend
    across examples.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
