"""Orders and splits: length-grouped batches (little padding) and label-stratified splits."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbours have similar lengths, so batches carry little padding.

    Indices are shuffled (seed + epoch), cut into chunks of `group` indices, and each chunk is
    sorted by length; the idea of transformers' `group_by_length`. Lightning wraps it for DDP.
    """

    def __init__(self, lengths: list[int], group: int, seed: int):
        self.lengths, self.group, self.seed, self.epoch = lengths, group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        idx = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(idx)
        for i in range(0, len(idx), self.group):
            yield from sorted(idx[i : i + self.group], key=lambda j: -self.lengths[j])


def stratified_split(labels: list, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Split indices so that each label keeps its share in every split.

    Per label, indices are shuffled with `seed` and `round(n_label * fraction)` go to each named
    split; the rest go to `"train"`. With BBC News (503/369/403/505/347 distinct articles) and
    0.1/0.1 this gives 1,703 / 212 / 212.

    Returns:
        `{"train": [...], **{name: [...] for name in fractions}}`, each sorted.
    """
    by_label: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    rng = random.Random(seed)
    out: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    for y in sorted(by_label, key=str):
        idx = by_label[y]
        rng.shuffle(idx)
        start = 0
        for name, frac in fractions.items():
            n = round(len(idx) * frac)
            out[name] += idx[start : start + n]
            start += n
        out["train"] += idx[start:]
    return {name: sorted(v) for name, v in out.items()}
