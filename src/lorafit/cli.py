"""The `lorafit` command: `lorafit train [hydra overrides]` and the adapter tools.

`train` hands its arguments to Hydra unchanged, so everything Hydra accepts works
(`-m`, `--cfg job`, `+experiment=...`, `hydra/launcher=joblib`).
"""

from __future__ import annotations

import sys

USAGE = """usage: lorafit COMMAND [ARGS]

commands:
  train [overrides]   fine-tune (Hydra overrides; -m for a multirun; --help for config groups)
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
    print(f"lorafit: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
