"""Run logging: `metrics.jsonl` (always), Weights & Biases (optional), and the run's self-description."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from neco.engine.disk import is_write_failure, write_error

log = logging.getLogger("neco")


class MetricsLogger:
    """Appends one JSON object per call to `<run_dir>/metrics.jsonl` and mirrors it to W&B when enabled."""

    def __init__(self, run_dir: Path, cfg, run_config: Optional[dict] = None, run_id: Optional[str] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if cfg.name == "wandb" and cfg.wandb.mode != "disabled":
            import wandb  # imported lazily: it is slow to import and most runs do not use it

            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                                    dir=str(run_dir), config=run_config, id=run_id, resume="allow",
                                    tags=list(cfg.wandb.tags), name=Path(run_dir).name)
        elif cfg.name not in ("jsonl", "wandb"):
            raise ValueError(f"logger.name={cfg.name!r}: choose jsonl or wandb")

    def log(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            if is_write_failure(err):
                raise write_error(err, self.path.parent, self.path.name) from None
            raise
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records logged after `step` (the steps a resumed run will log again), atomically. A line cut
    short by a kill is dropped too. Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("step", 0) > step:
            dropped += bool(line.strip())
            continue
        kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if is_write_failure(err):
                raise write_error(err, path.parent, path.name, "; it is unchanged") from None
            raise
    return dropped


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: torch.device, seed: int) -> dict[str, Any]:
    """What a reader needs to know to reproduce the run: code version, packages, device and seed."""
    import hydra
    import timm
    import torchvision

    info = {
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "seed": seed,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info
