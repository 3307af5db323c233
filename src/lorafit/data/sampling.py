"""Orders and splits: length-grouped optimizer steps (little padding, resumable mid-epoch) and
label-stratified splits.

A training loader here yields one optimizer step per item: the step's batch, or with gradient
accumulation the list of its micro-batches, so the task can normalise the loss by everything the
step holds before its first backward pass (`lorafit.tasks.base`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

Step = Any  # a collated batch (dict of tensors), or the list of a step's micro-batches


class StepSampler:
    """Length-grouped order cut into optimizer steps: for each step, this rank's micro-batches.

    Indices are shuffled (seed + epoch), cut into chunks of 16 global steps, and each chunk sorted
    longest first (the idea of transformers' `group_by_length`), so neighbours have similar lengths.
    The order is then cut into global steps of `batch_size x accumulate x world_size` examples,
    and each step into micro-batches of `batch_size`; rank r takes micro-batches r, r + W, ...
    Every rank computes the same order from the seed, so the examples of a step do not depend on
    how it is split over micro-batches and devices; nothing is shared and nothing needs wrapping in
    a `DistributedSampler` (which would shuffle the grouping away). With one device the last step
    may be short; with several it is dropped, so that every rank runs the same steps.

    With `max_tokens`, a step whose micro-batches would pad to more than `max_tokens` positions
    (examples x longest, rounded up to 8) has each of them cut into k smaller ones, the same k on
    every rank (from the whole step): the step keeps its examples and its loss (normalised by the
    whole step's count), and the largest activations any micro-batch holds are bounded by
    `max_tokens` instead of `batch_size x max_length`.

    Args:
        lengths: tokens per example.
        batch_size: examples per micro-batch; `accumulate` micro-batches per step on each of
            `world_size` devices; `rank` is this device's.
        seed: shuffle seed; epoch e shuffles with seed + e (`set_epoch`, which Lightning calls).
        max_tokens: padded positions per micro-batch at most (None: no limit); one example longer
            than that is a micro-batch of its own.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        accumulate: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
    ):
        self.lengths, self.batch_size, self.accumulate = lengths, batch_size, accumulate
        self.max_tokens = max_tokens
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.step_size = batch_size * accumulate * world_size  # examples per global step

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        n = len(self.lengths)
        return math.ceil(n / self.step_size) if self.world_size == 1 else n // self.step_size

    def __iter__(self) -> Iterator[list[list[int]]]:
        idx = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(idx)
        group = self.step_size * 16
        order = [
            j
            for i in range(0, len(idx), group)
            for j in sorted(idx[i : i + group], key=lambda j: -self.lengths[j])
        ]
        b = self.batch_size
        for s in range(len(self)):
            step = order[s * self.step_size : (s + 1) * self.step_size]
            micro = [step[i : i + b] for i in range(0, len(step), b)]
            yield [part for m in micro[self.rank :: self.world_size] for part in self.cut(m, micro)]

    def parts(self, micro: list[int]) -> int:
        """Micro-batches `micro` must become so that none pads to more than `max_tokens`
        positions (examples x the longest, rounded up to 8); one example is always one."""
        longest = -(-max(self.lengths[j] for j in micro) // 8) * 8
        return -(-len(micro) // max(1, self.max_tokens // longest))

    def cut(self, micro: list[int], step: list[list[int]]) -> list[list[int]]:
        """`micro` as k near-equal consecutive parts, k from the step's micro-batch that needs
        the most: each part then holds at most `max_tokens // longest` examples."""
        if not self.max_tokens:
            return [micro]
        k = min(len(micro), max(self.parts(m) for m in step))
        size, extra = divmod(len(micro), k)
        bounds = [i * size + min(i, extra) for i in range(k + 1)]
        return [micro[bounds[i] : bounds[i + 1]] for i in range(k)]


def device_share(trainer) -> dict[str, int]:
    """`StepSampler`'s `rank` and `world_size` from a Lightning trainer (None: one device)."""
    if trainer is None:
        return {"rank": 0, "world_size": 1}
    return {"rank": trainer.global_rank, "world_size": trainer.world_size}


def eval_loader(data, batch_size: int, collate_fn: Callable, num_workers: int, trainer):
    """A validation/test loader, longest examples first (`longest_first`: batches of similar
    lengths hold little padding, and the largest comes first; token-weighted means do not depend
    on the order); over several devices each example goes to exactly
    one of them (Lightning's `UnrepeatedDistributedSampler`, rank r takes r, r + W, ...).

    Lightning's default distributed sampler pads the last round by repeating examples, so that
    every rank runs the same number of batches; the repeats would then count twice in a mean
    over all tokens, and `eval_loss` would differ from one device's. Here ranks may run one batch
    fewer: evaluation steps hold no collective (metrics are reduced once, at the end).
    """
    data = longest_first(data)
    share = device_share(trainer)
    sampler = None
    if share["world_size"] > 1:
        sampler = UnrepeatedDistributedSampler(
            data, num_replicas=share["world_size"], rank=share["rank"], shuffle=False
        )
    return DataLoader(
        data, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers
    )


def longest_first(data):
    """`data` (a `datasets.Dataset` or a list of examples with `input_ids`) in order of
    decreasing length (ties in data order); unchanged when it has no `input_ids`."""
    try:
        lengths = [len(ids) for ids in data["input_ids"]]
    except (KeyError, TypeError, IndexError):
        return data
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if order == list(range(len(lengths))):
        return data
    return data.select(order) if hasattr(data, "select") else [data[i] for i in order]


def split_stream(stream: datasets.IterableDataset, trainer) -> datasets.IterableDataset:
    """This device's share of a stream (`datasets.distributed.split_dataset_by_node`): whole
    shards per rank when the shards divide evenly, else every W-th example."""
    share = device_share(trainer)
    if share["world_size"] == 1:
        return stream
    return split_dataset_by_node(stream, rank=share["rank"], world_size=share["world_size"])


class StepLoader:
    """A map-style data set's optimizer steps in `StepSampler` order, resumable mid-epoch.

    Each item is one step: a collated batch, or with `accumulate > 1` the list of the step's
    micro-batches, each padded on its own. Lightning treats it as a sized iterable that is not a
    `DataLoader`: it wraps nothing, fetches one item per training step (no read-ahead for a
    loader with a length, so `state_dict()` counts exactly the steps trained) and calls
    `sampler.set_epoch` before each epoch. The task module keeps `state_dict()` in checkpoints
    and gives it back to `load_state_dict` before a resumed fit's first step, so the run goes on
    with the step after the last one trained.

    Args:
        data: indexable examples (a `datasets.Dataset` or a list of dicts).
        sampler: the step order.
        collate_fn: examples -> a batch, as for `DataLoader`; `num_workers` likewise.
    """

    def __init__(self, data, sampler: StepSampler, collate_fn: Callable, num_workers: int = 0):
        self.data, self.sampler, self.collate_fn = data, sampler, collate_fn
        self.num_workers = num_workers
        self.epoch, self.steps_done = 0, 0  # steps handed out in `epoch`

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        done = self.steps_done if self.epoch == self.sampler.epoch else 0
        return {"epoch": self.sampler.epoch, "steps_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.epoch, self.steps_done = state["epoch"], state["steps_done"]

    def __iter__(self) -> Iterator[Step]:
        steps = list(self.sampler)
        resume = self.epoch == self.sampler.epoch and self.steps_done < len(steps)
        start = self.steps_done if resume else 0  # a finished epoch iterated again starts over
        self.epoch, self.steps_done = self.sampler.epoch, start
        micro = iter(
            DataLoader(
                self.data,
                batch_sampler=[m for step in steps[start:] for m in step],
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
            )
        )
        for step in steps[start:]:
            batches = [next(micro) for _ in step]
            for batch, indices in zip(batches, step, strict=True):  # named in fault reports
                batch["example_index"] = torch.tensor(indices)
            self.steps_done += 1
            yield batches if len(batches) > 1 or self.sampler.accumulate > 1 else batches[0]


class StreamSteps:
    """A stream's optimizer steps: `accumulate` micro-batches of `batch_size` rows (fewer at the
    end). `sampler` is the `datasets.IterableDataset` itself, so Lightning's `set_epoch` reaches
    its shuffle (seed + epoch). Not resumable mid-epoch: a resumed run restarts the stream.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        batch_size: int,
        accumulate: int,
        collate_fn: Callable,
        num_workers: int = 0,
    ):
        self.sampler, self.batch_size, self.accumulate = stream, batch_size, accumulate
        self.collate_fn, self.num_workers = collate_fn, num_workers

    def __iter__(self) -> Iterator[Step]:
        loader = DataLoader(
            self.sampler,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )
        if self.accumulate == 1:
            yield from loader
            return
        step = []
        for batch in loader:
            step.append(batch)
            if len(step) == self.accumulate:
                yield step
                step = []
        if step:
            yield step


def stratified_split(labels: list, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Split indices so that each label keeps its share in every split, with `datasets`.

    `datasets.Dataset.train_test_split(stratify_by_column=...)` (scikit-learn's stratified
    shuffle split) on a `ClassLabel` column, seeded by `seed`: once to hold out all the named
    splits together (`sum(fractions)`, rounded up), then again to cut that holdout into the named
    splits. Per label, each split keeps about its share (to a row or two). With BBC News (2,127
    distinct articles) and 0.1/0.1 this gives 1,701 / 213 / 213.

    Args:
        labels: one label per row (any hashable values).
        fractions: split name -> share of the rows, for zero, one or two named splits.

    Returns:
        `{"train": [...], **{name: [...] for name in fractions}}`, each sorted.

    Raises:
        ValueError: more than two named splits; or from `datasets`: a label with one row, or a
            split with fewer rows than there are labels.
    """
    names, held = list(fractions), sum(fractions.values())
    if len(names) > 2:
        raise ValueError(f"at most two held-out splits, not {names}")
    values = {y: i for i, y in enumerate(dict.fromkeys(labels))}
    rows = datasets.Dataset.from_dict(
        {"index": list(range(len(labels))), "label": [values[y] for y in labels]},
        features=datasets.Features(
            {"index": datasets.Value("int64"), "label": datasets.ClassLabel(len(values))}
        ),
    )
    out: dict[str, list[int]] = {}
    if names:
        parts = rows.train_test_split(test_size=held, stratify_by_column="label", seed=seed)
        rows, holdout = parts["train"], parts["test"]
        if len(names) == 2:  # the second named split's share of the holdout
            share = fractions[names[1]] / held
            parts = holdout.train_test_split(test_size=share, stratify_by_column="label", seed=seed)
            out[names[1]], holdout = parts["test"]["index"], parts["train"]
        out[names[0]] = holdout["index"]
    out["train"] = rows["index"]
    return {name: sorted(out[name]) for name in ("train", *names)}
