"""More than one process: how a Hydra job starts its other ranks through Lightning's launcher, and
the shape of one optimizer step over them.

Lightning's DDP starts ranks 1..N-1 of a node by re-running the command line of rank 0
(`python -m lorafit.train ARGV`, `lightning.pytorch.strategies.launchers.subprocess_script`) with
`hydra.run.dir=<hydra.run.dir>` added. Two things in a Hydra job break that: in a multirun the
argv holds `-m` and the sweep (each rank would start the whole sweep), and `hydra.run.dir` is not
the job's folder. `prepare_launch` gives the launcher this job's own command instead: its resolved
overrides in run mode, its output folder, and no log file (rank 0 alone writes the run folder);
`ranks_scope` puts the process back as it was for the next job of a sweep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict, read_write
from torch import nn

log = logging.getLogger("lorafit")

# What Lightning's subprocess launcher puts into os.environ of the process that starts the ranks.
# (and OMP_NUM_THREADS, with torch's thread count lowered to a share of the cores per process).
LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMP_NUM_THREADS",
)
# Hydra settings that the other ranks must not inherit from a multirun: they run one job, in the
# run folder that rank 0 already has, and log to the terminal only.
_JOB_ONLY = ("hydra.run.", "hydra.sweep.", "hydra.job.name", "hydra.output_subdir", "hydra.mode")
_SWEEP_ONLY = ("hydra/sweeper", "hydra/launcher", "hydra.sweeper.", "hydra.launcher.")
_LOGGING = ("hydra/job_logging", "hydra.job_logging.")
_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def rank_argv(argv: list[str], task_overrides: list[str], hydra_overrides: list[str]) -> list[str]:
    """The command line (after the program) that starts another rank of this job.

    Args:
        argv: this process's `sys.argv[1:]`; its config-location flags (`-cn`, `-cd`, `-cp`) are
            kept, everything else (`-m`, sweep values) is replaced.
        task_overrides: the job's resolved overrides (`hydra.overrides.task`: in a multirun, this
            job's single values, e.g. `lora.r=8`).
        hydra_overrides: `hydra.overrides.hydra`; the ones about sweeping, the job's folder or
            logging are dropped.

    Returns:
        flags + overrides + `hydra.mode=RUN hydra/job_logging=stdout`; Lightning appends
        `hydra.run.dir=...`, `hydra.job.name=...` and `hydra.output_subdir=null`.
    """
    flags, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in _FLAGS_WITH_VALUE and i + 1 < len(argv):
            flags += argv[i : i + 2]
            i += 1
        elif a.split("=", 1)[0] in _FLAGS_WITH_VALUE:
            flags.append(a)
        i += 1
    skip = _JOB_ONLY + _SWEEP_ONLY + _LOGGING
    hydra = [o for o in hydra_overrides if not o.lstrip("+~").startswith(skip)]
    return [*flags, *hydra, *task_overrides, "hydra.mode=RUN", "hydra/job_logging=stdout"]


@contextlib.contextmanager
def ranks_scope() -> Iterator[None]:
    """Around one Hydra job: leaves the process as it found it for the next job of a multirun.

    On leaving, `sys.argv` is back (`prepare_launch` changes it), the process group is destroyed
    and the launcher's environment variables removed, so the next job of a sweep starts its own
    ranks on a fresh port instead of believing it is already one of them. Under `torchrun` or
    SLURM (ranks started outside) only `sys.argv` is restored.
    """
    launcher = "LOCAL_RANK" not in os.environ and "SLURM_PROCID" not in os.environ
    saved_argv, saved_env = list(sys.argv), {k: os.environ.get(k) for k in LAUNCH_ENV}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        sys.argv = saved_argv
        if launcher:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            torch.set_num_threads(threads)


def prepare_launch(world_size: int) -> None:
    """Before the first Lightning call of a job with several processes, in the process that
    starts them: `sys.argv` becomes this job's own command (`rank_argv`) and Hydra's `run.dir` the
    job's output folder, the two things Lightning's launcher reads. Nothing when one process
    runs or the ranks are started outside (`torchrun`, SLURM). Call inside `ranks_scope`."""
    if world_size == 1 or "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return
    hc = HydraConfig.get()
    sys.argv = [
        sys.argv[0],
        *rank_argv(sys.argv[1:], list(hc.overrides.task), list(hc.overrides.hydra)),
    ]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir


def set_threads(cfg: DictConfig) -> int:
    """Torch intra-op threads: `threads`, or an equal share of the cores per parallel joblib job."""
    n = cfg.get("threads")
    jobs = HydraConfig.get().launcher.get("n_jobs")  # only the joblib launcher has n_jobs
    if n is None and jobs:
        cores = os.cpu_count() or 1
        jobs = cores + 1 + jobs if jobs < 0 else jobs  # joblib: -1 = all cores, -2 = all but one
        n = max(1, cores // max(1, min(jobs, cores)))
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def step_shape(
    global_batch_size: int | None, batch_size: int, accumulate: int, world_size: int
) -> tuple[int, int]:
    """Per-device micro-batch and micro-batches per step that make one optimizer step.

    Without `global_batch_size`, `batch_size` x `accumulate` on each device holds and a step holds
    their product times `world_size` examples. With it, a step holds exactly `global_batch_size`
    examples whatever the number of devices: the micro-batch is the largest divisor of
    `global_batch_size / world_size` not above `batch_size` (the memory bound) and `accumulate`
    makes up the rest.

    Returns:
        `(micro_batch_size, accumulate)`.

    Raises:
        ValueError: `data.global_batch_size` not a positive multiple of the world size, or given
            together with `trainer.accumulate_grad_batches` > 1 (one of them decides).
    """
    if global_batch_size is None:
        return batch_size, accumulate
    per_device = global_batch_size // world_size if isinstance(global_batch_size, int) else 0
    if per_device < 1 or per_device * world_size != global_batch_size:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} must be a positive multiple of the "
            f"number of devices ({world_size}): e.g. data.global_batch_size="
            f"{world_size * max(1, per_device)}."
        )
    if accumulate != 1:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} and trainer.accumulate_grad_batches="
            f"{accumulate} both set the step: keep data.global_batch_size (accumulation follows "
            "from it and data.batch_size) or remove it."
        )
    micro = max(d for d in range(1, min(batch_size, per_device) + 1) if per_device % d == 0)
    return micro, per_device // micro


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The model's repeated block classes (transformers' `_no_split_modules`, e.g.
    `LlamaDecoderLayer`, `BertLayer`): FSDP's auto-wrap units, so each unit holds one block's
    frozen weights together with its LoRA weights.

    Raises:
        ValueError: the model names no such class (set `trainer.strategy.auto_wrap_policy`).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(
            f"{type(model).__name__} names no layer class to wrap (transformers' "
            "`_no_split_modules`): give trainer.strategy.auto_wrap_policy, e.g. "
            "'[transformers.models.llama.modeling_llama.LlamaDecoderLayer]'."
        )
    return found


def compile_layers(model: nn.Module, enabled: bool | None) -> int:
    """`trainer.compile`: compile each of the model's repeated blocks (`layer_classes`) with
    `torch.compile`, in place (`nn.Module.compile`: parameter names and state-dict keys stay).

    Regional compilation (PyTorch's recipe for transformer stacks): one block's graph is compiled
    once and reused by every layer, so compiling takes seconds, not the whole model's minutes;
    the LoRA layers inside each block compile with it. Returns the number of blocks compiled.
    """
    if not enabled:
        return 0
    blocks = [m for m in model.modules() if type(m) in layer_classes(model)]
    for block in blocks:
        block.compile(dynamic=True)
    log.info("trainer.compile: %d %s block(s) compiled (torch.compile, dynamic shapes).",
             len(blocks), type(blocks[0]).__name__ if blocks else "")  # fmt: skip
    return len(blocks)


def strategy_kwargs(strategy_cfg: Any, model: nn.Module) -> dict[str, Any]:
    """Trainer kwargs that the strategy needs from the model: FSDP's `auto_wrap_policy` when the
    config leaves it null (logged). Empty for every other strategy."""
    if not isinstance(strategy_cfg, DictConfig) or not str(
        strategy_cfg.get("_target_", "")
    ).endswith("FSDPStrategy"):
        return {}
    if strategy_cfg.get("auto_wrap_policy") is not None:
        return {}
    classes = layer_classes(model)
    log.info("FSDP units: %s", ", ".join(sorted(c.__name__ for c in classes)))
    return {"strategy": instantiate(strategy_cfg, auto_wrap_policy=classes)}


@contextlib.contextmanager
def full_weights(trainer) -> Iterator[None]:
    """Whole parameters in the model's own modules for the duration (every rank must enter).

    FSDP and DeepSpeed ZeRO-3 keep each parameter sharded over the ranks, so the adapter read
    from the modules would be this rank's shard (often empty). FSDP: `summon_full_params`
    (rank 0 gathers, no write-back); ZeRO-3: `deepspeed.zero.GatheredParameters`. Any other
    strategy holds whole tensors already: nothing happens.
    """
    strategy = trainer.strategy
    kind = type(strategy).__name__
    stage = (getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage")
    if kind == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(
            strategy.model, writeback=False, rank0_only=True
        ):
            yield
    elif kind == "DeepSpeedStrategy" and stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(strategy.model.parameters())):
            yield
    else:
        yield
