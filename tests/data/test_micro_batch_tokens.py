"""`data.micro_batch_tokens`: a step of long examples is cut into more micro-batches, keeping its
examples (so its loss, normalised by the whole step), the same cut on every rank."""

import random

import pytest

from lorafit.data.sampling import StepLoader, StepSampler


def lengths(n: int = 200, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([20, 40, 60, 250]) for _ in range(n)]


def padded(micro, lens) -> int:
    return len(micro) * -(-max(lens[j] for j in micro) // 8) * 8


@pytest.mark.parametrize("world_size", [1, 2])
def test_cut_keeps_every_step_and_bounds_each_micro_batch(world_size):
    lens = lengths()
    whole = [
        list(StepSampler(lens, 8, 2, seed=1, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    cut = [
        list(StepSampler(lens, 8, 2, seed=1, rank=r, world_size=world_size, max_tokens=512))
        for r in range(world_size)
    ]
    split_steps = 0
    for r in range(world_size):
        assert len(cut[r]) == len(whole[r])
        for step_whole, step_cut in zip(whole[r], cut[r], strict=True):
            # the same examples in the same order: only where micro-batches end moves
            assert [j for m in step_cut for j in m] == [j for m in step_whole for j in m]
            for m in step_cut:
                assert len(m) == 1 or padded(m, lens) <= 512
            split_steps += len(step_cut) > len(step_whole)
    assert split_steps > 0  # the 250-token examples make 8 x 256 = 2,048 > 512: cut
    for s in range(len(cut[0])):  # every rank runs the same number of micro-batches
        assert len({len(cut[r][s]) for r in range(world_size)}) == 1


def test_loader_yields_the_micro_batches_of_a_cut_step():
    lens = lengths(48)
    data = [{"input_ids": [1] * n} for n in lens]

    def collate(rows):
        return {"n": len(rows)}

    plain = list(StepLoader(data, StepSampler(lens, 8), collate))
    assert all(isinstance(step, dict) for step in plain)  # one batch per step, as before
    steps = list(StepLoader(data, StepSampler(lens, 8, max_tokens=256), collate))
    assert len(steps) == len(plain) and any(isinstance(s, list) for s in steps)
    examples = [b["n"] for s in steps for b in (s if isinstance(s, list) else [s])]
    assert sum(examples) == len(lens)
