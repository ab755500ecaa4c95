"""Where this project's files are, from wherever a command or a notebook runs (the root or a subfolder)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The folder of the Hydra configs: the copy installed inside the package (``neco/conf``, present only when
    neco was installed from a wheel or ``pip install .``), else the checkout's top-level ``conf/`` (an editable
    install or ``PYTHONPATH=<checkout>``). Every entry point and every reader of config files goes through here,
    so an installed package never depends on the working directory."""
    packaged = PACKAGE / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    return PACKAGE.parent / "conf"


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``conf/train.yaml``:
    the repository root, whether a notebook runs from it or from ``notebooks/``. Falls back to ``start``."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "conf" / "train.yaml").is_file():
            return folder
    return start


def output_dir(start: str | os.PathLike | None = None) -> Path:
    """``paths.output_dir`` as the configs resolve it: ``$NECO_OUTPUT``, else ``$NECO_ROOT/outputs``, else the
    project root's ``outputs/``."""
    if os.environ.get("NECO_OUTPUT"):
        return Path(os.environ["NECO_OUTPUT"]).expanduser()
    root = Path(os.environ["NECO_ROOT"]).expanduser() if os.environ.get("NECO_ROOT") else project_root(start)
    return root / "outputs"


def results_csv(start: str | os.PathLike | None = None) -> Path:
    """The results table: ``$NECO_RESULTS_CSV``, else ``<output dir>/results/results.csv``."""
    if os.environ.get("NECO_RESULTS_CSV"):
        return Path(os.environ["NECO_RESULTS_CSV"]).expanduser()
    return output_dir(start) / "results" / "results.csv"
