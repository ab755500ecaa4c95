"""`python -m neco.notebooks`: execute the notebooks top to bottom, as `make notebooks` and the tests do.

The kernel starts in the repository root (``--cwd``), and the executed copies, with their outputs and figures,
are written to ``outputs/notebooks/`` (``--out``); the notebooks in ``notebooks/`` stay as they are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from neco.project import project_root

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(notebook: str | Path, cwd: str | Path, out_dir: str | Path | None = None, timeout: int = 600):
    """Run ``notebook`` with the kernel's working directory ``cwd``; returns the executed notebook (and writes
    it to ``out_dir`` when given)."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(notebook)
    if not path.is_file():
        path = NOTEBOOKS / path
    nb = nbformat.read(path, as_version=4)
    # The kernel warns on every start that its local TCP link is unencrypted: noise for a local run.
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                   extra_arguments=["--IPKernelApp.log_level=ERROR"]).execute()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out_dir) / path.name)
    return nb


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neco.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--cwd", default=None, help="the kernel's working directory (default: the repository root)")
    parser.add_argument("--out", default=None, help="where the executed copies go (default: outputs/notebooks)")
    args = parser.parse_args(argv)
    cwd = Path(args.cwd) if args.cwd else project_root()
    out = Path(args.out) if args.out else cwd / "outputs" / "notebooks"
    names = args.names or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    try:
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        print("error: running the notebooks needs the dev extra: pip install -e '.[dev]'", file=sys.stderr)
        sys.exit(2)
    failed = []
    for name in names:
        print(f"running {name} (from {cwd})", flush=True)
        try:
            execute(name, cwd, out)
        except CellExecutionError as err:  # the notebook's own message (e.g. no results yet), not nbclient's trace
            print(f"error: {name}: {err.ename}: {err.evalue}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"  wrote {out / Path(name).name}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
