"""The pieces of multi-process runs that need no processes: the command the other ranks get, the
shape of one optimizer step, the unrepeated evaluation split, FSDP's wrap units."""

import pytest
import torch

from lorafit.data.sampling import eval_loader
from lorafit.distributed import layer_classes, rank_argv, step_shape


def test_other_ranks_run_this_job_alone_in_run_mode():
    argv = ["-m", "-cn", "mine", "lora.r=2,4", "hydra.sweep.dir=/s", "hydra/launcher=joblib"]
    task = ["lora.r=4", "trainer=ddp_cpu"]
    hydra = ["hydra.sweep.dir=/s", "hydra/launcher=joblib", "hydra.verbose=true"]
    hydra += ["hydra.job_logging.root.level=DEBUG", "hydra.mode=MULTIRUN"]
    out = rank_argv(argv, task, hydra)
    assert out == [
        "-cn", "mine", "hydra.verbose=true", "lora.r=4", "trainer=ddp_cpu",
        "hydra.mode=RUN", "hydra/job_logging=stdout",
    ]  # fmt: skip
    assert rank_argv(["--config-dir=/c"], [], []) == [
        "--config-dir=/c", "hydra.mode=RUN", "hydra/job_logging=stdout",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("global_batch", "batch", "world", "expected"),
    [
        (None, 8, 2, (8, 1)),  # per-device batch holds: 16 a step
        (16, 8, 2, (8, 1)),
        (16, 8, 1, (8, 2)),
        (8, 8, 2, (4, 1)),  # the micro-batch shrinks to fit
        (24, 5, 2, (4, 3)),  # largest divisor of 12 not above 5
        (7, 8, 1, (7, 1)),
    ],
)
def test_global_batch_size_sets_micro_batch_and_accumulation(global_batch, batch, world, expected):
    micro, accumulate = step_shape(global_batch, batch, 1, world)
    assert (micro, accumulate) == expected
    if global_batch:
        assert micro * accumulate * world == global_batch


def test_global_batch_size_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"data.global_batch_size=9 .* multiple .* \(2\)"):
        step_shape(9, 8, 1, 2)
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2"):
        step_shape(16, 8, 2, 1)


def test_evaluation_gives_each_example_to_exactly_one_rank():
    class Trainer:
        world_size = 3

        def __init__(self, rank):
            self.global_rank = rank

    data = list(range(10))
    seen = []
    for rank in range(3):
        loader = eval_loader(data, 2, lambda b: b, 0, Trainer(rank))
        seen += [x for batch in loader for x in batch]
    assert sorted(seen) == data  # no example twice (Lightning's default sampler pads with repeats)


def test_fsdp_units_are_the_models_decoder_layers(make_llama):
    model = make_llama()
    assert layer_classes(model) == {type(model.model.layers[0])}
    with pytest.raises(ValueError, match="trainer.strategy.auto_wrap_policy"):
        layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))
