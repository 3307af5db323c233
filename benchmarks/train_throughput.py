"""Training throughput, measured: lorafit vs transformers + PEFT, same model, data, LoRA and steps.

Both sides train the built-in SmolLM2-135M-Instruct (bf16 autocast; the baseline loads it in
float32 as the docs do, lorafit in its configured `model.dtype`, bfloat16 by default) with LoRA r=8,
lora_alpha 16 on q,k,v,o (dropout 0), AdamW and lorafit's default cosine schedule (from
conf/optimizer/adamw.yaml and conf/scheduler/cosine.yaml), gradient norm clipped to 1.0, batches of
8 from the same training split of the built-in conversations (`ChatDataModule`, seed 42), for the
same number of optimizer steps. Each side runs in its own process, so each has its own peak RSS;
the order alternates (baseline, lorafit, lorafit, baseline, ...) and each side reports its best run
(highest non-padding tokens/s).

- baseline: what the transformers/PEFT docs teach: `AutoModelForCausalLM.from_pretrained`,
  `peft.get_peft_model`, a seeded `RandomSampler` (as HF `Trainer`), `DataCollatorForSeq2Seq`
  padding to the longest example, `model(**batch).loss`, backward, clip, step, zero_grad.
- lorafit: `python -m lorafit.train` (its real Trainer path, default config) with the values
  above, `trainer.accelerator=cpu`, `eval.general_text=null`, `samples.num_prompts=0`,
  `logger=csv`, a run folder in a temporary one (`lorafit_overrides`) and `--lorafit-args`;
  `StepTimer`, a callback added through Hydra, times its steps.

A step is timed from the moment its batch is in hand to the end of the optimizer step (data
loading is outside on both sides; for lorafit, Lightning's `on_train_batch_start` to the callbacks'
`on_train_batch_end`, so its logging and per-step checks count, its last-step checkpoint does not);
the first `--warmup` steps are not counted.

    python benchmarks/train_throughput.py [--steps 40] [--batch-size 8] [--repeats 2]
        [--lorafit-args "model.dtype=bfloat16 data.packing=true"] [--out results.json]
    python benchmarks/train_throughput.py --tiny   # smoke run: tiny random Llama, 5 steps

FLOPs counted per training step (model FLOPs: useful work only, the same formula for both sides;
norms, activations, softmax, RoPE and the loss itself are not counted):

- every `nn.Linear` of the decoder (all but the output head; P = sum of in x out): forward 2P and
  backward 2P (input gradients only: the base is frozen) per non-padding token: 4P per token;
- LoRA, per adapted Linear (in, out): forward 2r(in + out), backward 2r(in + out) for the input
  gradient and 2r(in + out) for A's and B's gradients: 6r(in + out) per non-padding token;
- attention, per layer: QK^T and AV forward 2 x d x c each (d = heads x head_dim, c = keys the
  token sees), backward twice that: 12 x d x c per token and layer, with c = t for the t-th token
  (causal) of its own example, i.e. 12 x d x L(L + 1)/2 per example of L tokens and layer (an
  example: a row's non-padding tokens, or one segment of a packed row by its `position_ids`);
- the output head (hidden x vocab), at supervised positions only (those whose next token is a
  label): forward 2 x h x V + input gradient 2 x h x V = 4 x h x V per supervised token. Both
  implementations compute it at every position; the rest is not useful work and not counted.

MFU = (FLOPs of the timed steps / their seconds) / the peak: a large square matmul in the
benchmark's own process (bf16 where the CPU has native bf16, else float32), best round over
`--peak-seconds`.

Peak RSS is each side process's peak since its model was loaded: `lorafit train` restarts the
kernel's count there (`lorafit.runinfo.reset_peak_rss`) and the baseline calls the same function
at the same point. It is the kernel's VmHWM, read as the process ends (lorafit's also after each
step and validation, as lorafit may restart the count between its phases). lorafit's includes
its validation before and after training, which lie outside the timed steps.

``--tiny`` swaps SmolLM2's weights for a tiny random Llama (SmolLM2's tokenizer, saved to a
temporary folder; lorafit reads it through `model=hf model.name_or_path=DIR`), the sizes for
minimal ones and lorafit's validation for 2 batches; everything else runs unchanged. Its numbers
mean nothing and, unless ``--out`` is given, it only prints them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = "smollm2_135m"
SEED = 42
IGNORE_INDEX = -100
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
# Defaults of the size options for the real run and for the smoke run (`--tiny`).
SIZES = {
    "full": dict(steps=40, warmup=3, repeats=2, peak_seconds=5.0, peak_size=2048),
    "tiny": dict(steps=5, warmup=1, repeats=1, peak_seconds=0.2, peak_size=256),
}
LAST = 10  # the training loss reported: mean over the last LAST steps
CEILING_ROWS = 512  # rows of the matmul-ceiling measurement: lorafit's default micro-batch tokens


# -- what one step holds -----------------------------------------------------------------------


def example_lengths(batch: dict) -> list[int]:
    """Non-padding tokens of each example in a (B, T) batch: a row's, or with `position_ids`
    (a packed row) each segment's, a segment starting where the position restarts at 0."""
    mask = batch["attention_mask"].bool()
    if "position_ids" not in batch:
        return mask.sum(1).tolist()
    lengths = []
    for pos, row_mask in zip(batch["position_ids"], mask, strict=True):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            n = int(row_mask[a:b].sum())
            if n:
                lengths.append(n)
    return lengths


def step_counts(batches: list[dict]) -> dict:
    """Counts of one optimizer step's micro-batches: non-padding tokens, supervised tokens
    (`labels[:, 1:] != -100`), (B, T) positions and each example's length."""
    return {
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "supervised": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        "positions": sum(b["input_ids"].numel() for b in batches),
        "lengths": [n for b in batches for n in example_lengths(b)],
    }


def vm_hwm_mb() -> float:
    """This process's peak RSS in MiB since the kernel's count last restarted (Linux VmHWM; else
    `ru_maxrss`, the peak since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_side(
    out: Path, steps: list[dict], peak_mb: float, eval_loss: float | None = None
) -> None:
    """One side's result file: its steps, peak RSS, thread count and held-out loss."""
    data = {"steps": steps, "peak_rss_mb": peak_mb, "threads": torch.get_num_threads()}
    data["eval_loss"] = eval_loss
    out.write_text(json.dumps(data))


class StepTimer(L.Callback):
    """Times each training step of a `lorafit train` run and writes them, with the run's peak RSS,
    to `out` as the process ends (added with `+callbacks.bench._target_=train_throughput.StepTimer
    +callbacks.bench.out=FILE`, `benchmarks/` on PYTHONPATH).

    Args:
        out: the JSON file to write.
    """

    def __init__(self, out: str):
        self.out, self.steps, self.peak_mb = Path(out), [], 0.0
        self._counts, self._t0 = {}, 0.0
        atexit.register(self.write)  # as the process ends: after validation and saving

    def write(self) -> None:
        write_side(self.out, self.steps, max(self.peak_mb, vm_hwm_mb()))

    def sample_peak(self) -> None:
        """Keep the kernel's peak so far: lorafit may restart the count between its phases."""
        self.peak_mb = max(self.peak_mb, vm_hwm_mb())

    def on_validation_end(self, trainer, pl_module) -> None:
        self.sample_peak()

    def on_train_end(self, trainer, pl_module) -> None:
        self.sample_peak()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._counts = step_counts(batch if isinstance(batch, list) else [batch])
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The step's mean loss, read once here (a host sync, so the time is honest on a GPU too).
        loss = float(outputs["loss"]) if outputs and "loss" in outputs else math.nan
        seconds = time.perf_counter() - self._t0
        self.steps.append({**self._counts, "seconds": seconds, "loss": loss})
        self.sample_peak()


# -- the two sides -----------------------------------------------------------------------------


def common_overrides(batch_size: int, tiny_dir: str | None) -> list[str]:
    """Config overrides both sides read: model, data, seed, optimizer and schedule."""
    model = ["model=hf", f"model.name_or_path={tiny_dir}"] if tiny_dir else [f"model={BUILTIN}"]
    return [
        *model,
        "data=conversations",
        f"data.batch_size={batch_size}",
        f"seed={SEED}",
        "optimizer=adamw",
        "scheduler=cosine",
        "samples.num_prompts=0",
    ]


def compose(overrides: list[str]):
    """The composed `train` config (lorafit's conf/) with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lorafit.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def native_bf16() -> bool:
    from lorafit.runinfo import cpu_has_bf16

    return cpu_has_bf16()


def run_baseline(a: argparse.Namespace) -> None:
    """The baseline side, in this process: transformers + PEFT as their docs teach."""
    from hydra.utils import instantiate
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

    from lorafit.config import group_object
    from lorafit.models import ModelConfig, load_tokenizer, resolve_model_dir
    from lorafit.runinfo import reset_peak_rss

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = compose(common_overrides(a.batch_size, a.tiny_dir))
    set_seed(cfg.seed)
    model_cfg = group_object(ModelConfig, cfg.model, "model")
    model_dir = resolve_model_dir(model_cfg)
    tokenizer = load_tokenizer(model_dir, model_cfg)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)  # as lorafit train
    datamodule.setup("fit")
    train_set = datamodule.train_set  # the same split lorafit trains on: input_ids, labels
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reset_peak_rss(since="model load")  # where lorafit train restarts its count
    config = LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **LORA)
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params)  # torch AdamW with adamw.yaml's lr, decay
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, num_training_steps=a.steps)
    loader = DataLoader(
        train_set,
        batch_size=a.batch_size,
        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed)),
        collate_fn=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
    )
    bf16 = native_bf16()  # lorafit train runs float32 where bf16 would be emulated; so does this
    steps: list[dict] = []
    while len(steps) < a.steps:
        for batch in loader:
            if len(steps) == a.steps:
                break
            counts = step_counts([batch])
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            value = loss.item()
            steps.append({**counts, "seconds": time.perf_counter() - t0, "loss": value})
    peak = vm_hwm_mb()  # the training's peak: the evaluation below is the benchmark's, not the
    # baseline's own work (lorafit's validations are part of its run and stay in its peak)
    write_side(Path(a.side_out), steps, peak, held_out_loss(model, datamodule, tokenizer, bf16))


@torch.no_grad()
def held_out_loss(model, datamodule, tokenizer, bf16: bool) -> float:
    """The baseline's loss per supervised token on lorafit's validation split (the examples
    lorafit's `eval_loss` is computed on), batches of `data.eval_batch_size`, as transformers
    computes it (`model(**batch).loss`, weighted by each batch's supervised count)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    model.eval()
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    loader = DataLoader(datamodule.val_set, batch_size=datamodule.eval_batch_size,
                        collate_fn=collate)  # fmt: skip
    total = count = 0.0
    for batch in loader:
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def lorafit_overrides(a: argparse.Namespace, run_dir: Path, out: Path) -> list[str]:
    targets = ",".join(LORA["target_modules"])
    extra = ["trainer.limit_val_batches=2"] if a.tiny else []  # a quick validation, same path
    return [
        *common_overrides(a.batch_size, a.tiny_dir),
        f"trainer.max_steps={a.steps}",
        "trainer.accelerator=cpu",
        f"lora.r={LORA['r']}",
        f"lora.lora_alpha={LORA['lora_alpha']}",
        f"lora.target_modules=[{targets}]",
        "lora.lora_dropout=0",
        "eval.general_text=null",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        "+callbacks.bench._target_=train_throughput.StepTimer",
        f"+callbacks.bench.out={out}",
        *([f"threads={a.threads}"] if a.threads else []),
        *extra,
        *shlex.split(a.lorafit_args),
    ]


def run_side(side: str, a: argparse.Namespace, tmp: Path, i: int) -> dict:
    """Run one side in its own process; return its result file's content."""
    out = tmp / f"{side}_{i}.json"
    if side == "lorafit":
        cmd = ["-m", "lorafit.train", *lorafit_overrides(a, tmp / f"lorafit_run_{i}", out)]
    else:
        cmd = [__file__, "--side", "baseline", "--side-out", str(out)]
        cmd += ["--steps", str(a.steps), "--batch-size", str(a.batch_size)]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        cmd += ["--tiny-dir", a.tiny_dir] if a.tiny_dir else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")])
        ),  # train_throughput.StepTimer
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in benchmarks/
        "HYDRA_FULL_ERROR": "1",
    }
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"The {side} side failed (exit status {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    if side == "lorafit":  # its held-out loss: the run's own eval_loss_after
        metrics = json.loads((tmp / f"lorafit_run_{i}" / "metrics.json").read_text())
        result["eval_loss"] = metrics["eval_loss_after"]
    if len(result["steps"]) != a.steps:
        sys.exit(f"The {side} side ran {len(result['steps'])} steps, not {a.steps}.")
    return result


# -- FLOPs, peak and summary -------------------------------------------------------------------


def flop_model(model_dir: str) -> dict[str, float]:
    """The FLOP coefficients of the docstring's formula, read from the model's config (the model
    is built on the meta device: no weights are read)."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = lora = 0
    shapes: dict[tuple[int, int], int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not head:
            linear += m.in_features * m.out_features
            shapes[m.in_features, m.out_features] = (
                shapes.get((m.in_features, m.out_features), 0) + 1
            )
            if name.rsplit(".", 1)[-1] in LORA["target_modules"]:
                lora += m.in_features + m.out_features
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "per_token": 4 * linear + 6 * LORA["r"] * lora,
        "per_key": 12 * config.num_attention_heads * head_dim * config.num_hidden_layers,
        "per_supervised": 4 * head.in_features * head.out_features,
        "shapes": shapes,
    }


def shape_matmul_gflops(shapes: dict, m: int, seconds: float, dtype: torch.dtype) -> float:
    """The matmul rate this model's layers can reach, GFLOP/s: each body Linear's forward
    (m, in) @ (in, out) and input gradient (m, out) @ (out, in) at m rows (a micro-batch's
    tokens), timed alone (best round), weighted by how many layers have that shape. Divided by
    the square-matmul peak it is a ceiling for MFU: the rest of a step (norms, attention, RoPE,
    the loss, the optimizer) only lowers it."""
    flops = secs = 0.0
    for (n_in, n_out), count in shapes.items():
        for k, n in ((n_in, n_out), (n_out, n_in)):
            rate = matmul_gflops(m, k, n, seconds / (2 * len(shapes)), dtype)
            flops += 2 * m * k * n * count
            secs += 2 * m * k * n * count / (rate * 1e9)
    return flops / secs / 1e9


def step_flops(step: dict, coef: dict[str, float]) -> float:
    keys = sum(n * (n + 1) // 2 for n in step["lengths"])  # causal: token t sees t keys
    return (
        coef["per_token"] * step["tokens"]
        + coef["per_key"] * keys
        + coef["per_supervised"] * step["supervised"]
    )


def peak_matmul_gflops(seconds: float, n: int, dtype: torch.dtype) -> float:
    """Best rate of an (n, n) @ (n, n) matmul in `dtype` over rounds filling `seconds`, GFLOP/s."""
    return matmul_gflops(n, n, n, seconds, dtype)


def matmul_gflops(m: int, k: int, n: int, seconds: float, dtype: torch.dtype) -> float:
    """Best rate of an (m, k) @ (k, n) matmul in `dtype` over rounds filling `seconds`, GFLOP/s."""
    x, y = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.matmul(x, y)  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(x, y)
        dt = time.perf_counter() - t0
        best = max(best, 2 * m * k * n * reps / dt / 1e9)
        if time.perf_counter() >= end:
            return best
        reps = max(1, min(reps * 2, int(reps * 0.25 / dt)))  # rounds of ~0.25 s


def summarize(run: dict, warmup: int, coef: dict, peak_gflops: float) -> dict:
    """One side's run -> rates over the timed steps, loss, RSS and MFU."""
    timed = run["steps"][warmup:]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(step_flops(s, coef) for s in timed)
    return {
        "tokens_per_s": tokens / seconds,
        "supervised_tokens_per_s": sum(s["supervised"] for s in timed) / seconds,
        "peak_rss_mb": run["peak_rss_mb"],
        "loss": statistics.fmean(s["loss"] for s in run["steps"][-LAST:]),
        "eval_loss": run["eval_loss"],
        "flops_per_token": flops / tokens,
        "mfu": flops / seconds / (peak_gflops * 1e9),
        "padding": 1 - tokens / sum(s["positions"] for s in timed),
        "threads": run["threads"],
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {cpu}, {os.cpu_count()} cores ({usable} usable)"


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama, 5 steps")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 40)")
    p.add_argument("--warmup", type=int, help="first steps not timed (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, help="runs per side, order alternating (default 2)")
    p.add_argument("--peak-seconds", type=float, help="time of the peak matmul (default 5)")
    p.add_argument("--peak-size", type=int, help="n of the (n, n) peak matmul (default 2048)")
    p.add_argument("--threads", type=int, help="torch threads on both sides (default: torch's)")
    p.add_argument("--lorafit-args", default="", help="extra `lorafit train` overrides, quoted")
    p.add_argument("--out", help="also write the final JSON object to this file")
    p.add_argument("--side", choices=["baseline"], help=argparse.SUPPRESS)  # one side's process
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--tiny-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in SIZES["tiny" if a.tiny else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.side == "baseline":
        return run_baseline(a)
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves no step after --warmup {a.warmup}")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        from lorafit.config import group_object
        from lorafit.models import ModelConfig, resolve_model_dir

        builtin = resolve_model_dir(group_object(ModelConfig, compose([]).model, "model"))
        from bench_merge import write_tiny_base  # the merge benchmark's tiny Llama, same tokenizer

        a.tiny_dir = write_tiny_base(Path(tmp) / "tiny") if a.tiny else None
        run(a, Path(tmp), a.tiny_dir or builtin)


def run(a: argparse.Namespace, tmp: Path, model_dir: str) -> None:
    """Peak matmul, then the sides in alternating order; print the report."""
    bf16 = native_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = peak_matmul_gflops(a.peak_seconds, a.peak_size, dtype)
    coef = flop_model(model_dir)
    ceiling = shape_matmul_gflops(coef.pop("shapes"), CEILING_ROWS, a.peak_seconds, dtype)
    pairs = (("baseline", "lorafit"), ("lorafit", "baseline"))
    order = [side for i in range(a.repeats) for side in pairs[i % 2]]
    runs: dict[str, list[dict]] = {"baseline": [], "lorafit": []}
    for i, side in enumerate(order):
        runs[side].append(summarize(run_side(side, a, tmp, i), a.warmup, coef, peak))
    best = {side: max(r, key=lambda s: s["tokens_per_s"]) for side, r in runs.items()}
    report(a, order, runs, best, peak, dtype, bf16, ceiling)


def report(a, order, runs, best, peak, dtype, bf16, ceiling) -> None:
    import peft
    import transformers

    model = (
        "Tiny random Llama (smoke run, `--tiny`; SmolLM2's tokenizer, float32)"
        if a.tiny
        else "SmolLM2-135M-Instruct (built-in; baseline float32 weights, lorafit its model.dtype)"
    )
    precision = (
        "bf16 autocast (the CPU has native bf16)"
        if bf16
        else "float32: this CPU has no native bf16 (AVX-512 BF16 or AMX), so lorafit train turns "
        "bf16-mixed into 32-true and the baseline runs without autocast too"
    )
    b, lf = best["baseline"], best["lorafit"]
    ratio = lf["tokens_per_s"] / b["tokens_per_s"]
    lines = [
        "# Benchmark: training throughput, lorafit vs transformers + PEFT "
        "(`make bench-train`, `benchmarks/train_throughput.py`)",
        "",
        f"{model}; LoRA r={LORA['r']}, lora_alpha {LORA['lora_alpha']} on q,k,v,o, dropout 0; "
        f"{a.steps} optimizer steps of batch {a.batch_size}, timed after {a.warmup} warm-up "
        f"step(s); {precision}.",
        f"lorafit overrides added: `{a.lorafit_args or '(none)'}`.",
        f"Best of {a.repeats} run(s) per side (highest tokens/s); order: {', '.join(order)}.",
        "",
        "| side | tokens/s | supervised tokens/s | peak RSS MB | last-10 loss | held-out loss "
        "| MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, s in best.items():
        lines.append(
            f"| {side} | {s['tokens_per_s']:.1f} | {s['supervised_tokens_per_s']:.1f} | "
            f"{s['peak_rss_mb']:.0f} | {s['loss']:.4f} | {s['eval_loss']:.4f} | "
            f"{100 * s['mfu']:.2f}% |"
        )
    all_runs = "; ".join(
        side + " " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs) for side, rs in runs.items()
    )
    lines += [
        "",
        f"Ratio lorafit / baseline (non-padding tokens/s): {ratio:.3f}. Every run's tokens/s: "
        f"{all_runs}.",
        f"Machine: {machine()}; torch {torch.__version__} (threads: baseline {b['threads']}, "
        f"lorafit {lf['threads']}), transformers {transformers.__version__}, peft "
        f"{peft.__version__}, python {platform.python_version()}.",
        f"Peak: {peak:.1f} GFLOP/s ({a.peak_size} x {a.peak_size} {str(dtype).split('.')[-1]} "
        f"matmul, best round of {a.peak_seconds:g} s). Model FLOPs per non-padding token "
        f"(docstring's formula): baseline {b['flops_per_token'] / 1e6:.1f} M, lorafit "
        f"{lf['flops_per_token'] / 1e6:.1f} M.",
        f"Matmul ceiling: this model's body Linears at {CEILING_ROWS} rows (forward and input "
        f"gradient, each timed alone) reach {ceiling:.1f} GFLOP/s = {ceiling / peak:.2f} of the "
        "peak: no step of this model, whatever else it does, has a higher MFU.",
        f"Padding share of the (B, T) positions: baseline {100 * b['padding']:.1f}%, lorafit "
        f"{100 * lf['padding']:.1f}%.",
        "Peak RSS: each process's peak since its model was loaded; lorafit's includes its "
        "validation before and after training (outside the timed steps).",
        "Losses: the last-10 training loss is over different examples on each side (lorafit's "
        "steps are length-grouped, the baseline's random), so the JSON's `*_loss` is the "
        "held-out loss after training on the same validation examples (lorafit's eval_loss; "
        "the baseline's computed likewise after its steps, outside its peak RSS).",
        "",
    ]
    result = {
        "lorafit_tokens_per_s": round(lf["tokens_per_s"], 2),
        "baseline_tokens_per_s": round(b["tokens_per_s"], 2),
        "ratio": round(ratio, 4),
        "mfu": round(lf["mfu"], 5),
        "baseline_mfu": round(b["mfu"], 5),
        "peak_matmul_gflops": round(peak, 2),
        "matmul_ceiling": round(ceiling / peak, 4),
        "lorafit_peak_rss_mb": round(lf["peak_rss_mb"], 1),
        "baseline_peak_rss_mb": round(b["peak_rss_mb"], 1),
        "lorafit_loss": round(lf["eval_loss"], 4),
        "baseline_loss": round(b["eval_loss"], 4),
        "lorafit_train_loss_last10": round(lf["loss"], 4),
        "baseline_train_loss_last10": round(b["loss"], 4),
        "lorafit_supervised_tokens_per_s": round(lf["supervised_tokens_per_s"], 2),
        "baseline_supervised_tokens_per_s": round(b["supervised_tokens_per_s"], 2),
        "steps": a.steps,
        "warmup": a.warmup,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "bf16": bf16,
        "lorafit_overrides": a.lorafit_args,
    }
    line = json.dumps(result)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print("\n".join(lines))
    print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
