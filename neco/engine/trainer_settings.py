"""What the training loop reads of a run's config, gathered in one place (`TrainerSettings.from_config`).

The trainer takes these few settings instead of the whole config: what it depends on is listed here, and the
callers that build a trainer without a full run (the step benchmark) say exactly what they set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from neco.engine.fingerprint import fingerprint


@dataclass(frozen=True)
class TrainerSettings:
    # length of the run
    epochs: int  # optim.epochs
    max_steps: Optional[int]  # max_steps: stop early; the schedules still span every epoch
    # one optimizer step
    accumulate: int  # optim.accumulate
    grad_clip: Optional[float]  # optim.grad_clip
    ema_timing: str  # optim.ema_timing
    zero_loss_step: str  # optim.zero_loss_step
    num_global: int  # data.num_global
    batch_size: int  # data.batch_size: where a resumed epoch restarts in the sampler
    loss_mask: str  # loss.mask
    use_teacher: bool  # loss.use_teacher
    mask_blur_padding: str  # loss.mask_blur_padding
    # checkpoints, logging and the training monitors
    seed: int  # seed: each process's random streams after a resume with another number of processes
    checkpoint_every: int  # checkpoint_every
    keep_checkpoints: int  # keep_checkpoints
    log_every: int  # logger.log_every
    progress: bool  # logger.progress
    monitor_before_training: bool  # monitor.before_training
    monitor_after_training: bool  # monitor.after_training
    monitor_every_n_epochs: int  # monitor.every_n_epochs
    monitor_every_n_steps: int  # monitor.every_n_steps

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainerSettings:
        optim, data, loss, logger, monitor = cfg.optim, cfg.data, cfg.loss, cfg.logger, cfg.monitor
        return cls(
            epochs=optim.epochs, max_steps=cfg.max_steps, accumulate=optim.accumulate, grad_clip=optim.grad_clip,
            ema_timing=optim.ema_timing, zero_loss_step=optim.zero_loss_step, num_global=data.num_global,
            batch_size=data.batch_size, loss_mask=loss.mask, use_teacher=loss.use_teacher,
            mask_blur_padding=loss.mask_blur_padding, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
            keep_checkpoints=cfg.keep_checkpoints, log_every=logger.log_every, progress=logger.progress,
            monitor_before_training=monitor.before_training, monitor_after_training=monitor.after_training,
            monitor_every_n_epochs=monitor.every_n_epochs, monitor_every_n_steps=monitor.get("every_n_steps", 0),
        )


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """What every checkpoint records of its run: the resolved config and what a resume must keep of it."""
    return {"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "fingerprint": fingerprint(cfg)}  # neco.engine.fingerprint
