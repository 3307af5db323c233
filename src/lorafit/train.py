"""`lorafit train`: one Hydra config -> base model + LoRA + data -> Lightning fit -> run folder.

    python -m lorafit.train lora.r=16 trainer.max_steps=100;  lorafit train -m lora.r=4,8,16

compose (Hydra) -> validate -> build -> fit -> evaluate -> save -> objective. The run folder
(Hydra's output dir) receives `.hydra/`, `metrics.json`, `adapter/`, `loss_curve.png`,
`samples.jsonl`, Lightning's `csv/metrics.csv` and `checkpoints/` (see `lorafit.artifacts`).
`metrics.json` is written last, so a folder without it is not a finished run; a failed run
writes `failed.json`, an interrupted one `interrupted.json` (resume with `resume=RUN_DIR`).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lorafit import artifacts, runinfo, sweeping
from lorafit.config import CONF_DIR, TRAINER_EXTRA_KEYS, group_object
from lorafit.distributed import (
    compile_layers,
    full_weights,
    prepare_launch,
    ranks_scope,
    set_threads,
    step_shape,
    strategy_kwargs,
)
from lorafit.lora import LoRAConfig, lora_report
from lorafit.models import ModelConfig, load_model, load_tokenizer, resolve_model_dir
from lorafit.reproduce import resume_argv
from lorafit.schema import check_config, check_override_keys
from lorafit.tasks import faults
from lorafit.tasks.base import LoRAModule, dropout_rates
from lorafit.tasks.evaluation import RunEvaluation, before_cache_key
from lorafit.tasks.general import general_loss

log = logging.getLogger("lorafit")


def validate(cfg: DictConfig) -> type[LoRAModule]:
    """Checks that need no weights or data, and the one setting the machine decides: a bf16
    `trainer.precision` on a CPU without native bfloat16 becomes `32-true` (logged), as bf16 is
    emulated there, slower than float32. Returns the task's LightningModule class.

    Raises:
        ValueError: a required value (`???`) left unset; a key that the object of its node does
            not take (a typo, `+model.x=...`); a value of the wrong type or range (`lora.r=0`); a
            group other than `model` and `lora` without `_target_`; a multirun that sweeps
            `lora.target_modules` over single names; or a `data` choice that misfits `task`.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"Required config value(s) not set: {', '.join(missing)}. Give each on the command "
            f"line, e.g. `lorafit train {missing[0]}=...`."
        )
    choices = HydraConfig.get().runtime.choices
    check_config(cfg, built={"model": ModelConfig, "lora": LoRAConfig})  # keys, types, ranges
    precision, accelerator = str(cfg.trainer.get("precision")), cfg.trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto"
        and not torch.cuda.is_available()
        and not torch.backends.mps.is_available()
    )
    if precision.startswith("bf16") and on_cpu and not runinfo.cpu_has_bf16():
        log.warning(
            "trainer.precision=%s -> 32-true (and a bfloat16 model.dtype -> float32): this CPU "
            "has no native bfloat16 (AVX-512 BF16 or AMX), so bf16 would be emulated, slower "
            "than float32.",
            precision,
        )
        cfg.trainer.precision = "32-true"
        if str(cfg.model.get("dtype")) == "bfloat16":  # bf16 matmuls would be emulated too
            cfg.model.dtype = "float32"
    task = get_class(cfg.task._target_)
    data_task = getattr(get_class(cfg.data._target_), "task", None)
    if data_task != task.name:
        raise ValueError(
            f"task={choices.get('task', task.name)} does not fit data={choices.get('data')}: that "
            f"data module ({cfg.data._target_}) feeds task={data_task}. Pick a data set for "
            f"{task.name} (classification: data=bbc_news or data=csv_classification; causal_lm: "
            "data=conversations, file or text), or use experiment=minilm_bbc for classification."
        )
    return task


def build(cfg: DictConfig, task: type[LoRAModule], phases: runinfo.MemoryPhases | None = None):
    """Config -> (model, tokenizer, model_dir, lora config, lora report, datamodule).

    The data is read before the model so that the task can size the model from it (a classifier
    head gets one output per label). `lora.target_modules: null` (`lora=none`) trains every
    parameter instead of injecting LoRA; a task's new head is trained fully either way.

    Raises:
        ValueError: bad input (model, data or LoRA targets); the message names the config key.
    """
    # A node without _target_ (a user's `lora` file holding only `r: 4`) takes the defaults.
    model_cfg: ModelConfig = group_object(ModelConfig, cfg.model, "model")
    lora: LoRAConfig = group_object(LoRAConfig, cfg.lora, "lora")
    phases = phases or runinfo.MemoryPhases()
    phases.start("data")
    model_dir = resolve_model_dir(model_cfg)
    tokenizer = load_tokenizer(model_dir, model_cfg)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    datamodule.setup("fit")  # raises DataError when no training / validation example is left
    phases.start("load")
    model = load_model(model_dir, model_cfg, task.name, **task.model_kwargs(datamodule))
    phases.stop()
    # peak_rss_mb counts from here: a GGUF conversion, the loader's own peak and what earlier
    # runs of a multirun left are not this run's training memory (metrics.json: peak_rss_scope).
    runinfo.reset_peak_rss(since="model load")
    phases.start("setup")
    heads = task.head_names(model)
    if lora.full_finetune:
        model.requires_grad_(True)
    else:
        lora.inject(model, modules_to_save=heads)  # a new head trains whole, with no LoRA inside
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    # from_pretrained returns eval mode and Lightning keeps each module's mode, so switch to train
    # mode here: dropout (LoRA's and the base's, as in PEFT/Trainer fine-tuning) is on in training.
    model.train()
    report = lora_report(model)
    log.info("LoRA: %s", report)
    return model, tokenizer, model_dir, lora, report, datamodule


def make_trainer(cfg: DictConfig, model: torch.nn.Module) -> L.Trainer:
    """The Trainer with every logger of `logger` and every callback of `callbacks`; a W&B logger
    gets the sweep as group and the overrides as run name.

    `trainer.accumulate_grad_batches` and `trainer.gradient_clip_val` do not reach Lightning: the
    task module runs each optimizer step itself (its loss is normalised by the whole step, see
    `lorafit.tasks.base`), and Lightning refuses both under manual optimization. `train` hands
    them to the data module and the task module. `trainer.deterministic` is the one switch for
    deterministic algorithms (Lightning sets torch's, on any device). FSDP's wrap units come
    from `model` (`lorafit.distributed.strategy_kwargs`).
    """
    hc = HydraConfig.get()
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        kwargs = {}
        if str(node.get("_target_", "")).endswith("WandbLogger"):
            kwargs["name"] = node.name or hc.job.override_dirname or "defaults"
            if node.group is None and hc.mode == RunMode.MULTIRUN:
                # an Optuna study's name, else the sweep folder's 2026-11-29/18-55-00
                day_time = "/".join(Path(hc.sweep.dir).parts[-2:])
                kwargs["group"] = sweeping.wandb_group(hc.sweeper) or day_time
        loggers.append(instantiate(node, **kwargs))
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    callbacks += sweeping.pruning_callbacks()  # an Optuna trial's pruning, in a sweep's job
    lightning_keys = [k for k in cfg.trainer if k not in TRAINER_EXTRA_KEYS]  # ours: `train` reads
    trainer = instantiate(
        OmegaConf.masked_copy(cfg.trainer, lightning_keys),
        logger=loggers or False,
        callbacks=callbacks,
        accumulate_grad_batches=1,
        gradient_clip_val=None,
        **strategy_kwargs(cfg.trainer.get("strategy"), model),
        **({} if cfg.trainer.get("plugins") else {"plugins": [faults.AtomicCheckpointIO()]}),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def finish_wandb(failed: bool) -> None:
    """Close the W&B run, so the next run of a sweep in this process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=int(failed))


def save_weights(cfg, task, model, tokenizer, model_dir, lora, datamodule) -> int:
    """The adapter (or, with `lora=none`, the whole model) and `samples.jsonl` into the run folder.
    Returns the bytes of the saved weights."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if lora.full_finetune:
        adapter_bytes = artifacts.save_full_model(model, tokenizer, run_dir / "model")
    else:
        extra = {
            "config_hash": runinfo.config_hash(cfg),
            "model": cfg.model.name,
            "versions": runinfo.versions(),
        }
        if task.peft_task_type == "SEQ_CLS":  # `lorafit merge` sizes the head from these names
            extra["id2label"] = {str(i): str(n) for i, n in model.config.id2label.items()}
        heads = [n.rsplit(".", 1)[-1] for n in task.head_names(model)]
        adapter_bytes = artifacts.save_lora(
            model,
            tokenizer,
            lora,
            run_dir / "adapter",
            model_dir,
            task.peft_task_type,
            heads,
            extra,
        )
    if cfg.samples.num_prompts > 0 and getattr(datamodule, "sample_prompts", None):
        artifacts.write_samples(
            model,
            tokenizer,
            datamodule.sample_prompts,
            cfg.samples.max_new_tokens,
            run_dir / "samples.jsonl",
        )
    return adapter_bytes


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tuning described by `cfg` and write the run folder. Returns the metrics."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    task = validate(cfg)
    runinfo.reset_peak_rss()
    set_threads(cfg)  # Lightning's DDP launcher may lower it: metrics read it after the fit
    L.seed_everything(cfg.seed, workers=True)
    phases = runinfo.MemoryPhases()  # metrics.json memory_phases: peak RSS per phase
    model, tokenizer, model_dir, lora, report, datamodule = build(cfg, task, phases)
    compile_layers(model, cfg.trainer.get("compile"))
    module = instantiate(cfg.task)(
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        skip_nonfinite_batches=cfg.trainer.get("skip_nonfinite_batches"),
    )
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate}: give a whole number >= 1 "
            "(micro-batches per optimizer step)."
        )
    trainer = make_trainer(cfg, model)
    prepare_launch(trainer.world_size)  # DDP: the other ranks re-run this job's own command
    datamodule.batch_size, datamodule.accumulate = step_shape(
        datamodule.global_batch_size, datamodule.batch_size, accumulate, trainer.world_size
    )
    per_step = datamodule.batch_size * datamodule.accumulate * trainer.world_size
    n_train = len(datamodule.train_set) if hasattr(datamodule.train_set, "__len__") else None
    if trainer.world_size > 1 and n_train is not None and n_train < per_step:
        raise ValueError(
            f"The training split holds {n_train} examples, fewer than one optimizer step of "
            f"{per_step} on {trainer.world_size} devices (several devices run whole steps only). "
            "Lower data.batch_size or data.global_batch_size, or give more training data."
        )
    rates = dropout_rates(model)
    log.info(
        "One optimizer step: %d example(s) = %d micro-batch(es) of %d on each of %d device(s); "
        "its loss is the mean over all the step's %s. Dropout in training: %s.",
        per_step,
        datamodule.accumulate,
        datamodule.batch_size,
        trainer.world_size,
        task.loss_unit,
        f"on (p = {', '.join(map(str, rates))})" if rates else "off",
    )
    if cfg.ckpt_path and getattr(datamodule, "streaming", False):
        log.warning("A streamed training set is not resumable mid-epoch: it restarts its epoch.")

    general = general_loss(cfg.get("eval"), task.name, tokenizer)  # forgetting: text off the task
    key = before_cache_key(cfg, datamodule, model_dir, trainer.world_size)
    evaluation = RunEvaluation(trainer, module, datamodule, general, key)
    phases.start("validate_before")
    before = evaluation.before()  # eval_loss (+ general_loss for causal_lm), cached by base+data
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    phases.start("fit")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_seconds = time.perf_counter() - t0
    phases.start("validate_after")
    after = evaluation.after()  # the fit's last validation when it ran on the final weights
    task_metrics = module.after_fit(trainer, datamodule, run_dir)  # every rank: may evaluate
    phases.start("save")
    with full_weights(trainer):  # FSDP / ZeRO-3: whole tensors while rank 0 saves; all enter
        if trainer.is_global_zero:  # DDP: one process writes the run folder
            adapter_bytes = save_weights(cfg, task, model, tokenizer, model_dir, lora, datamodule)
    phases.stop()
    if not trainer.is_global_zero:
        return {"eval_loss_after": after["eval_loss"]}
    csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    if csv_logger is not None:
        csv_logger.save()
        artifacts.plot_loss_curve(
            Path(csv_logger.log_dir) / "metrics.csv",
            run_dir / "loss_curve.png",
            f"{cfg.model.name} r={lora.r} alpha={lora.lora_alpha}",
            task.loss_label,
        )
    metrics = artifacts.run_metrics(
        cfg, task, lora, report, datamodule, module, trainer, before, after, task_metrics,
        adapter_bytes=adapter_bytes, train_seconds=train_seconds, threads=torch.get_num_threads(),
    )  # fmt: skip
    metrics |= {"eval_before_cached": evaluation.cached_before, "memory_phases": phases.table}
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):  # the final numbers as the W&B run summary
            lg.experiment.summary.update(
                {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
            )
    artifacts.write_metrics(run_dir / "metrics.json", metrics)
    for stale in ("failed.json", "interrupted.json"):  # of earlier attempts, before a resume
        (run_dir / stale).unlink(missing_ok=True)
    log.info(
        "eval_loss %.4f -> %.4f (%.0f%% lower); adapter %s bytes; run folder %s",
        metrics["eval_loss_before"],
        metrics["eval_loss_after"],
        100 * metrics["eval_loss_reduction"],
        adapter_bytes,
        run_dir,
    )
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point. Returns `eval_loss_after` (the objective sweepers minimise).

    In a multirun a failed run writes `failed.json` and returns None, so the sweep goes on: an
    Optuna sweep records the trial as failed (it refuses NaN, and a number would be a fake
    objective). When no run of a multirun finished, `lorafit.report.ReportCallback` ends the
    process with exit status 1.
    """
    hc = HydraConfig.get()
    try:
        with ranks_scope():  # DDP: the next job of a sweep starts its own ranks afresh
            value = train(cfg)["eval_loss_after"]
        finish_wandb(failed=False)
        return value
    except faults.RunInterrupted as e:  # Ctrl-C / SIGTERM: a resumable run folder, then exit
        finish_wandb(failed=True)
        run_dir = Path(hc.runtime.output_dir)
        resume = f"lorafit train resume={run_dir}" if e.checkpoint else None
        if sweeping.current_trial() is not None:  # the study asks this trial's values again
            resume = "the same `lorafit train -m ...` command: the Optuna study resumes"
        if rank_zero_only.rank == 0:
            artifacts.write_metrics(
                run_dir / "interrupted.json",
                {
                    "status": "interrupted",
                    "signal": e.signal_name,
                    "step": e.step,
                    "checkpoint": e.checkpoint,
                    "resume": resume,
                },
            )
        print(f"\nlorafit: {e}\nResume: {resume or 'start again'}\n", file=sys.stderr)
        raise SystemExit(130 if e.signal_name == "SIGINT" else 143) from None
    except Exception as e:
        if sweeping.is_pruned(e):  # the sweeper tells the study PRUNED; the run folder says so
            finish_wandb(failed=False)
            run_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
            sweeping.write_pruned(run_dir, e, overrides, cfg.seed)
            raise
        if isinstance(e, InstantiationException) and isinstance(e.__cause__, ValueError | OSError):
            e = e.__cause__  # a config object refused its values: that message is the one to see
        finish_wandb(failed=True)
        run_dir = Path(hc.runtime.output_dir)
        failure = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "overrides": list(hc.overrides.task),
            "traceback": traceback.format_exc(),
            "seed": cfg.seed,
        }
        if rank_zero_only.rank == 0:  # the other ranks of a DDP run write nothing
            artifacts.write_metrics(run_dir / "failed.json", failure)
        if hc.mode == RunMode.MULTIRUN:  # one broken run must not end the sweep
            log.error("Run failed (recorded in %s/failed.json): %s", run_dir, e)
            return None
        if isinstance(e, ValueError | OSError):  # bad input: one clear paragraph, no traceback
            print(f"\nlorafit: error: {e}\n", file=sys.stderr)
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    try:  # `resume=RUN_DIR`: the run's own overrides, continued in its folder
        sys.argv[1:] = resume_argv(sys.argv[1:])
        check_override_keys(sys.argv[1:])  # `lora.rnak=8`: the closest keys, before Hydra's error
    except ValueError as error:
        print(f"\nlorafit: error: {error}\n", file=sys.stderr)
        raise SystemExit(1) from None
    main()
