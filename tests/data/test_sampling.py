"""Training order on the real built-in conversations: one optimizer step per loader item, a new
order every epoch through the loader Lightning actually iterates, the same steps on one device or
two, and a resumed loader that continues after the last step taken."""

import json
import random

import lightning as L
import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lorafit.data.lm import ChatDataModule
from lorafit.data.sources import load_chatterbot


def examples(batch) -> list[tuple[int, ...]]:
    """The unpadded token ids of each example in a collated batch."""
    return [
        tuple(ids[mask.bool()].tolist())
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def micro_batches(step) -> list[dict]:
    return step if isinstance(step, list) else [step]


class Recorder(L.LightningModule):
    """Records the examples of every training step by epoch; trains nothing."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen: dict[int, list[list[tuple]]] = {}

    def training_step(self, step, batch_idx):
        got = [ex for b in micro_batches(step) for ex in examples(b)]
        self.seen.setdefault(self.current_epoch, []).append(got)

    def configure_optimizers(self):
        return None


def fit_two_epochs(dm) -> dict[int, list[list[tuple]]]:
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(recorder, datamodule=dm)
    return recorder.seen


@pytest.fixture(scope="module")
def chats(smol_tokenizer):
    """96 built-in conversations (more than one 64-example length group of 4-example steps)."""
    dm = ChatDataModule(smol_tokenizer, max_train_examples=96, batch_size=4, num_samples=0)
    dm.setup()
    return dm


def test_each_item_is_one_step_of_length_grouped_micro_batches(chats):
    chats.accumulate = 2
    try:
        steps = list(chats.train_dataloader())
    finally:
        chats.accumulate = 1
    assert len(steps) == 96 // 8
    assert all(isinstance(s, list) and [len(b["labels"]) for b in s] == [4, 4] for s in steps)
    seen = [ex for s in steps for b in s for ex in examples(b)]
    assert len(seen) == len(set(seen)) == 96
    # Each micro-batch is padded on its own: to its longest example, rounded up to 8.
    for b in (b for s in steps for b in s):
        assert b["input_ids"].shape[1] == -(-max(map(len, examples(b))) // 8) * 8


def test_every_epoch_has_a_new_order_through_lightning(chats):
    seen = fit_two_epochs(chats)
    first, second = ([ex for step in seen[e] for ex in step] for e in (0, 1))
    assert len(first) == len(set(first)) == 96 and set(first) == set(second)
    assert first != second


def test_a_stream_is_reshuffled_every_epoch(smol_tokenizer, tmp_path):
    convs, _ = load_chatterbot("english")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs[:40]))
    dm = ChatDataModule(
        smol_tokenizer,
        source="datasets",
        path=str(path),
        streaming=True,
        val_examples=4,
        batch_size=4,
        num_samples=0,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    seen = fit_two_epochs(dm)
    first, second = ([ex for step in seen[e] for ex in step] for e in (0, 1))
    assert len(first) == 36 and set(first) == set(second)
    assert first != second


@pytest.fixture
def restore_rank_zero():
    """Setting a trainer's global rank sets Lightning's process-wide `rank_zero_only.rank`, which
    would silence every later in-process run's logger files: put it back."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    saved = rank_zero_only.rank, fabric_rank_zero.rank
    yield
    rank_zero_only.rank, fabric_rank_zero.rank = saved


def test_two_devices_train_the_steps_of_one(chats, smol_tokenizer, restore_rank_zero):
    """Batch 2 on each of 2 devices (a DDP trainer, not launched) covers exactly the examples of
    batch 4 on one device, step by step, in every epoch; and the epochs differ."""
    one = ChatDataModule(smol_tokenizer, max_train_examples=96, batch_size=4, num_samples=0)
    one.setup()
    two = ChatDataModule(smol_tokenizer, max_train_examples=96, batch_size=2, num_samples=0)
    two.setup()

    def epochs(dm, trainer) -> list[list[list[tuple]]]:
        dm.trainer = trainer
        fitting = (TrainerFn.FITTING, RunningStage.TRAINING)
        loader = _process_dataloader(trainer, *fitting, dm.train_dataloader())
        out = []
        for epoch in (0, 1):
            _set_sampler_epoch(loader, epoch)
            out.append([examples(b) for s in loader for b in micro_batches(s)])
        return out

    single = epochs(one, L.Trainer(accelerator="cpu", devices=1, logger=False))
    ranks = []
    for rank in (0, 1):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
        trainer.strategy.cluster_environment.set_global_rank(rank)
        assert (trainer.world_size, trainer.global_rank) == (2, rank)
        ranks.append(epochs(two, trainer))
    for epoch in (0, 1):
        steps = list(zip(ranks[0][epoch], ranks[1][epoch], strict=True))
        assert len(steps) == len(single[epoch]) == 24
        for (a, b), want in zip(steps, single[epoch], strict=True):
            assert not set(a) & set(b) and set(a) | set(b) == set(want)
    assert single[0] != single[1] and ranks[0][0] != ranks[0][1]


def test_a_resumed_loader_continues_after_the_last_step_taken(chats):
    loader = chats.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    taken = [examples(next(it)) for _ in range(5)]
    state = loader.state_dict()
    rest = [examples(b) for b in it]
    assert state == {"epoch": 1, "steps_done": 5} and len(taken) + len(rest) == 24

    resumed = chats.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does before the resumed epoch
    assert [examples(b) for b in resumed] == rest
    resumed.sampler.set_epoch(2)  # the next epoch starts at its beginning
    assert len(list(resumed)) == 24


def test_one_device_order_is_the_seeded_length_groups(chats):
    """Shuffled with seed + epoch, cut into groups of 16 steps (64 examples here), each sorted
    longest first, then cut into steps: the order of one device without accumulation."""
    lengths = chats.train_lengths
    for epoch in (0, 1):
        loader = chats.train_dataloader()
        loader.sampler.set_epoch(epoch)
        idx = list(range(96))
        random.Random(chats.seed + epoch).shuffle(idx)
        order = [j for i in (0, 64) for j in sorted(idx[i : i + 64], key=lambda j: -lengths[j])]
        rows = [tuple(chats.train_set[j]["input_ids"]) for j in order]
        want = [rows[s : s + 4] for s in range(0, 96, 4)]
        assert [examples(b) for b in loader] == want
