"""Checks made before Hydra writes anything into the run directory (a Hydra callback, see conf/train.yaml).

Hydra creates the run directory and rewrites its `.hydra/` files before `neco.train` starts. An output folder
that cannot be written, a run directory in use by another live process, or a resume that would be refused stop
here with one line and exit status 2, so that neither Hydra's traceback nor its files replace anything. The
training run repeats the lock and resume checks itself: they are the ones that count.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from neco.engine import dist
from neco.engine.checkpoint import find_checkpoint, load_checkpoint
from neco.engine.disk import check_writable
from neco.engine.fingerprint import ResumeRefused, check_resume
from neco.engine.run_lock import RunLock
from neco.errors import UserError


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _without_hydra(config: DictConfig) -> DictConfig:
    return OmegaConf.create({k: config[k] for k in config if k != "hydra"})


def check_resume_early(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a resume with other settings before anything is written. A checkpoint that cannot be read is left
    to the run, which says so."""
    path = find_checkpoint(cfg.resume, run_dir)
    if path is None:
        return
    try:  # memory-mapped: only the small entries are read, not the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return
    if not isinstance(state, dict):
        return
    try:
        check_resume(state, cfg, path, force=bool(cfg.resume_force))
    except ResumeRefused:
        # A damaged checkpoint (unreadable, non-finite weights) is said first: resume_force could not help it.
        load_checkpoint(path)
        raise


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        problem = check_writable(run_dir)
        if problem:
            _fail(f"{problem}; set paths.output_dir (or hydra.run.dir) to a writable folder")
        if dist.from_environment().rank != 0:
            return  # rank 0 alone locks and writes the run directory
        holder = RunLock(run_dir).live_holder()
        if holder is not None:
            _fail(RunLock(run_dir).message(holder))
        try:
            check_resume_early(_without_hydra(config), run_dir)
        except UserError as err:
            _fail(str(err))
        except Exception:  # anything else is the run's to report, with its context
            pass

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = check_writable(Path(str(config.hydra.sweep.dir)))
        if problem:
            _fail(f"{problem}; set paths.output_dir (or hydra.sweep.dir) to a writable folder")
