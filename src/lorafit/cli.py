"""The `lorafit` command: `lorafit train [hydra overrides]` and the adapter tools.

`train` hands its arguments to Hydra unchanged, so everything Hydra accepts works
(`-m`, `--cfg job`, `+experiment=...`, `hydra/launcher=joblib`). `merge` and `generate` take
ordinary options (`lorafit merge --help`).
"""

from __future__ import annotations

import argparse
import runpy
import sys

USAGE = """usage: lorafit COMMAND [ARGS]

commands:
  train [overrides]   fine-tune (Hydra overrides; -m for a multirun; --help for config groups)
  train --dry-run [overrides]   check config, data and targets, print the run's size; no folder
  merge SOURCE --out DIR   merge an adapter into its base, write a plain transformers folder
  generate [SOURCE]   answer prompts with a base, adapter, run or merged folder (--compare)
  report DIR          summary.csv, summary.md, tradeoff.png of a multirun folder
  reproduce RUN_DIR   re-run a run from its folder and compare the metrics
  estimate [MODEL] [overrides]   parameters, adapter size, peak memory, FLOPs; no weights read
  analyze RUN [RUN_B] what the adapter learned: spectra, effective rank, rank advice (--out DIR)
"""


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit merge",
        description="Merge LoRA adapter(s) into the base model, write a plain transformers folder "
        "(safetensors, tokenizer, generation config) and verify it against the unmerged model "
        "(merge_report.json).",
    )
    p.add_argument("sources", nargs="+", metavar="RUN_OR_ADAPTER_DIR")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default: the base's, from its config.json)",
    )
    p.add_argument("--base", help="base model folder or built-in name (default: from the adapter)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter: combine them")
    p.add_argument(
        "--combination", choices=["linear", "cat"], help="default: linear if ranks agree, else cat"
    )
    p.add_argument("--atol", type=float, help="max abs logit difference allowed")
    p.add_argument("--no-verify", action="store_true", help="keep the output even if it differs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--untie-embeddings",
        action="store_true",
        help="allow an adapter on an output head tied to the input embedding: the merged model "
        "gets its own head weight (tie_word_embeddings: false)",
    )
    return p


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit generate",
        description="Generate answers (chat template applied) from a base model, an adapter or "
        "run folder, or a merged folder; tokens stream to the terminal.",
    )
    p.add_argument("source", nargs="?", help="run/adapter/model folder (default: the base)")
    p.add_argument("--base", help="base model folder or built-in name (default: smollm2_135m)")
    p.add_argument("--prompt", action="append", default=[], help="a user turn (repeatable)")
    p.add_argument("--prompts-file", help='JSONL: {"prompt": ...} or {"messages": [...]} a line')
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="base and tuned answers side by side")
    return p


def merge(argv: list[str]) -> int:
    from lorafit.merge import merge_to_folder

    a = merge_parser().parse_args(argv)
    report = merge_to_folder(
        a.sources,
        a.out,
        a.dtype,
        base=a.base,
        weights=a.weights,
        combination=a.combination,
        verify=not a.no_verify,
        atol=a.atol,
        overwrite=a.overwrite,
        untie_embeddings=a.untie_embeddings,
    )
    cast, where = report["cast"], "inputs" if report["task_type"] == "SEQ_CLS" else "tokens"
    print(
        f"merged -> {a.out}, weights in {report['dtype']} (from {report['dtype_source']}).\n"
        f"merge check (float32): max abs logit diff {report['max_abs_diff']:.3g} (tolerance "
        f"{report['tolerance_abs']:g}), max rel {report['max_rel_diff']:.3g}, top-1 agreement "
        f"{100 * report['top1_agreement']:.1f}% on {report['positions']} {where}\n"
        f"{report['dtype']} cast: max abs logit diff {cast['max_abs_diff']:.3g} (bound "
        f"{cast['tolerance_abs']:g}), top-1 agreement {100 * cast['top1_agreement']:.1f}%"
        + ("" if report["passed"] else "\nCHECK FAILED (kept because of --no-verify)")
    )
    return 0


def generate(argv: list[str]) -> int:
    from lorafit import generate as gen

    a = generate_parser().parse_args(argv)
    gen.run(
        a.source,
        gen.read_prompts(a.prompt, a.prompts_file),
        base=a.base,
        compare=a.compare,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
    )
    return 0


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit analyze",
        description="What a LoRA update learned, per adapted layer (float32, CPU): singular "
        "values of scaling*B*A, effective ranks, stable rank, |dW|/|W|, the LoRA paper's "
        "amplification factor, intruder dimensions; with RUN_B the subspace similarity of the two "
        "runs' lora_A. Writes analysis.json, analysis.md, spectrum.png (and "
        "subspace_similarity.png).",
    )
    p.add_argument("run", metavar="RUN", help="run folder or adapter folder")
    p.add_argument("run_b", metavar="RUN_B", nargs="?", help="a second run to compare with")
    p.add_argument("--out", help="folder for the files (default: RUN)")
    p.add_argument("--base", help="base model folder or built-in name (default: from the adapter)")
    p.add_argument("--energy", type=float, default=0.9, help="effective-rank energy share")
    p.add_argument("--intruder-threshold", type=float, default=0.5, help="max |cos| of an intruder")
    p.add_argument("--intruder-top-k", type=int, default=10, help="tuned singular vectors examined")
    return p


def analyze(argv: list[str]) -> int:
    from pathlib import Path

    from lorafit.analyze import analyze as run_analysis

    a = analyze_parser().parse_args(argv)
    result = run_analysis(
        a.run,
        a.run_b,
        a.out,
        base=a.base,
        energy=a.energy,
        intruder_threshold=a.intruder_threshold,
        intruder_top_k=a.intruder_top_k,
    )
    plots = "spectrum.png" + (", subspace_similarity.png" if a.run_b else "")
    print(f"{result['rank_advice']['text']}")
    print(f"wrote analysis.json, analysis.md, {plots} in {Path(a.out or a.run)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train" and {"--dry-run", "dry_run=true", "+dry_run=true"} & set(rest):
        from lorafit.dryrun import main as dry_run  # checks and sizes the run; no run folder

        return dry_run(rest)
    if command == "train":
        # Exactly `python -m lorafit.train ...`: runpy gives `__main__` the module's spec, so the
        # process launchers of Lightning's DDP (which re-run `python -m <__main__.__spec__.name>`
        # for every other rank) and of Hydra start the other ranks the same way.
        sys.argv = [sys.argv[0], *rest]
        runpy.run_module("lorafit.train", run_name="__main__", alter_sys=True)
        return 0
    if command in ("merge", "generate", "analyze"):
        try:
            return {"merge": merge, "generate": generate, "analyze": analyze}[command](rest)
        except (ValueError, OSError, KeyError, NotImplementedError) as e:
            # bad input: one clear paragraph, no traceback
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"\nlorafit {command}: error: {msg}\n", file=sys.stderr)
            return 1
    if command == "estimate":
        from lorafit.estimate import main as estimate

        return estimate(rest)
    if command in ("report", "reproduce"):
        return sweep_tools(command, rest)
    print(f"lorafit: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


def sweep_tools(command: str, rest: list[str]) -> int:
    """`lorafit report DIR` and `lorafit reproduce RUN_DIR [--out DIR]`."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog=f"lorafit {command}")
    if command == "report":
        parser.add_argument("dir", help="multirun folder (hydra.sweep.dir) or any folder of runs")
    else:
        parser.add_argument("run_dir", help="a finished run folder (with metrics.json)")
        parser.add_argument("--out", help="rerun folder (default: RUN_DIR/reproduce)")
    args = parser.parse_args(rest)
    try:
        if command == "reproduce":
            from lorafit.reproduce import reproduce

            return reproduce(args.run_dir, args.out)
        from lorafit.report import write_report

        rows = write_report(args.dir)
    except ValueError as e:
        print(f"\nlorafit: error: {e}\n", file=sys.stderr)
        return 1
    print((Path(args.dir) / "summary.md").read_text())
    print(f"wrote summary.csv, summary.md, tradeoff.png ({len(rows)} runs) in {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
