"""Atomic checkpoint writes, full-state resume and finding the last checkpoint of a run (for requeue)."""

from __future__ import annotations

import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from neco.engine.disk import is_write_failure, output_errors, write_error
from neco.errors import UserError

_STEP = re.compile(r"^step_(\d+)\.pt$")


class ResumeError(UserError):
    """`resume=` points at something that is not a checkpoint of this project."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG the step touches, as tensors and plain numbers so that weights-only loading works."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_name(path: Path) -> Path:
    """A temporary name next to `path`, unique to this process: two writers never share a half-written file."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file.

    A failed write (a full disk above all) removes the partial file and raises a one-line OutputError; the file
    at `path`, if any, is left as it was."""
    path = Path(path)
    with output_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as err:  # a second Ctrl-C included: never leave the partial file behind
        tmp.unlink(missing_ok=True)
        if is_write_failure(err):
            raise write_error(err, path.parent, path.name,
                              "; the partial file was removed and the previous checkpoint is intact") from None
        raise


def save_checkpoint(state: dict, run_dir: Path, step: int, keep: int) -> Path:
    """Write `step_<N>.pt`, refresh `last.pt`, and delete all but the newest `keep` step files."""
    folder = checkpoint_dir(run_dir)
    path = folder / f"step_{step}.pt"
    save_atomic(state, path)
    last = folder / "last.pt"
    tmp = temporary_name(last)
    tmp.unlink(missing_ok=True)
    # A hard link is instant and atomic to rename; fall back to a second copy where links are not allowed.
    try:
        os.link(path, tmp)
        os.replace(tmp, last)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_atomic(state, last)
    for old in sorted(_step_files(folder))[:-keep] if keep > 0 else []:
        (folder / f"step_{old}.pt").unlink(missing_ok=True)
    return path


def _step_files(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir() if (m := _STEP.match(p.name))]


def set_aside_previous_run(run_dir: Path) -> Optional[Path]:
    """A run that starts from scratch (`resume=null`, or no checkpoint yet) in a directory holding checkpoints or
    metrics of an earlier start: move them to `superseded/<time>/`, so that the new run's step files, `last.pt`
    and metrics are never mixed with (or pruned in favour of) the earlier ones. Returns that folder, if any."""
    run_dir = Path(run_dir)
    previous = [p for p in (checkpoint_dir(run_dir), run_dir / "metrics.jsonl") if p.exists()]
    if not previous:
        return None
    target = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "+")
    with output_errors(run_dir):
        target.mkdir(parents=True)
        for path in previous:
            os.replace(path, target / path.name)
    return target


def find_checkpoint(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """Resolve `resume=` (auto | a run directory | a checkpoint file | null) to a checkpoint file or None."""
    if resume in (None, "", "null", "none"):
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        last = checkpoint_dir(path) / "last.pt"
        if not last.is_file():
            raise ResumeError(f"resume={resume}: no checkpoints/last.pt in that run directory")
        return last
    if not path.is_file():
        raise ResumeError(f"resume={resume}: no such file or run directory (use resume=auto, a run directory, "
                          "or a checkpoint path)")
    return path


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint read weights-only; damaged files and non-finite weights are one-line errors."""
    from neco.models.weights import WeightsError, check_finite, read_checkpoint

    try:
        state = read_checkpoint(path, key="resume")
        if not isinstance(state, dict) or "student" not in state or "step" not in state:
            raise ResumeError(f"resume={path}: not a training checkpoint of this project")
        for network in ("student", "teacher"):
            check_finite(state.get(network) or {}, f"{path} ({network})", key="resume")
    except WeightsError as err:
        raise ResumeError(f"{err} (resume=null starts over)") from None
    return state
