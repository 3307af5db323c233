"""The `lorafit` command: `lorafit train [hydra overrides]` and the adapter tools.

`train` hands its arguments to Hydra unchanged, so everything Hydra accepts works
(`-m`, `--cfg job`, `+experiment=...`, `hydra/launcher=joblib`).
"""

from __future__ import annotations

import sys

USAGE = """usage: lorafit COMMAND [ARGS]

commands:
  train [overrides]   fine-tune (Hydra overrides; -m for a multirun; --help for config groups)
  report DIR          summary.csv, summary.md, tradeoff.png of a multirun folder
  reproduce RUN_DIR   re-run a run from its folder and compare the metrics
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from lorafit import train

        sys.argv = ["lorafit train", *rest]
        train.main()
        return 0
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
