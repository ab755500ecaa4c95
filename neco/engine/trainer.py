"""The plain-PyTorch training loop: AMP, accumulation, EMA teacher, schedules, checkpoints, logging."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from neco.data.datasets import bad_image_count
from neco.data.workers import batches_of
from neco.engine import dist
from neco.engine.checkpoint import ResumeError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from neco.engine.log import MetricsLogger
from neco.engine.optim import Schedules
from neco.engine.trainer_settings import TrainerSettings
from neco.errors import UserError
from neco.loss.masks import teacher_foreground
from neco.models.ema import ema_update

log = logging.getLogger("neco")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stops and its last checkpoint stays as it was."""


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps = index into the schedules
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed


class Trainer:
    def __init__(self, *, student, teacher, objective, optimizer, schedules: Schedules, loader, sampler,
                 settings: TrainerSettings, run_record: dict, run_dir: Path, device: torch.device,
                 amp_dtype: Optional[torch.dtype], logger: MetricsLogger,
                 steps_per_epoch: int, evaluator: Optional[Callable] = None, ddp=None,
                 should_stop: Optional[Callable[[], bool]] = None):
        self.student, self.teacher, self.objective = student, teacher, objective
        # `ddp` (DistributedDataParallel around `student`) only runs the forward pass; everything else uses
        # the unwrapped student. `should_stop` is polled after every optimizer step (preemption).
        self.ddp, self.should_stop = ddp, should_stop
        self.optimizer, self.schedules = optimizer, schedules
        self.loader, self.sampler = loader, sampler
        # `run_record` (neco.engine.trainer_settings.run_record): the run's config, as each checkpoint stores it
        self.settings, self.run_record = settings, run_record
        self.run_dir, self.device = Path(run_dir), device
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.logger, self.evaluator = logger, evaluator
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * settings.epochs
        self.state = TrainState()
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self._saved_step: Optional[int] = None
        self._has_grads = False  # a micro-batch of the current optimizer step had a non-zero loss

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "rng": rng_state(),
            "config": self.run_record["config"],
            "fingerprint": self.run_record["fingerprint"],  # what a resume must keep (neco.engine.fingerprint)
        }

    def load(self, path: Path, ckpt: Optional[dict] = None) -> None:
        """Restore the full training state from `path` (or from `ckpt`, its contents already read)."""
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        ranks = ckpt.get("ranks")  # per-process queue and RNG states of a distributed run
        same_layout = len(ranks or [None]) == dist.world_size()
        if ranks and same_layout:
            ckpt.update(ranks[dist.rank()])
        elif not same_layout and "queue" in ckpt["objective"]:
            raise ResumeError(
                f"resume: {path} was written by {len(ranks or [None])} process(es) and this run has "
                f"{dist.world_size()}; each keeps loss.queue_length / processes queue rows, so resume with "
                "the same number of processes (or start over with resume=null)")
        try:
            self.student.load_state_dict(ckpt["student"])
            self.teacher.load_state_dict(ckpt["teacher"])
            self.objective.load_state_dict(ckpt["objective"])
        except RuntimeError as err:  # other sizes, reached only with resume_force=true
            first = str(err).splitlines()[1:2] or [str(err)]
            raise ResumeError(f"resume: the weights in {path} do not fit this model ({first[0].strip()}); resume "
                              "with the checkpoint's backbone and loss.head settings, or start over with "
                              "resume=null") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"])
        set_rng_state(ckpt["rng"])
        if not same_layout:  # another number of processes: give each its own stream from here on
            dist.seed_ranks(self.settings.seed + self.state.step)
        self._saved_step = self.state.step
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)

    def save(self) -> None:
        if self._saved_step == self.state.step:  # e.g. the end of the last epoch is also the end of the run
            return
        if dist.is_enabled():  # each process has its own queue and random streams; rank 0 writes them all
            queue = {k: v.cpu() for k, v in self.objective.state_dict().items()}
            mine = {"objective": queue, "rng": rng_state()}
            ranks = dist.all_gather_objects(mine)
        if dist.is_main():
            state = self.state_dict()
            if dist.is_enabled():
                state["ranks"] = ranks
            save_checkpoint(state, self.run_dir, self.state.step, self.settings.keep_checkpoints)
        self._saved_step = self.state.step

    # ----------------------------------------------------------------------------------------------- step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def compute_loss(self, crops: list[torch.Tensor], boxes: dict) -> torch.Tensor:
        G = self.settings.num_global
        masked = self.settings.loss_mask != "all"
        fg = None
        with self._autocast():
            student_maps = (self.ddp or self.student)(crops)
            if self.settings.use_teacher:
                with torch.no_grad():
                    out = self.teacher(crops[:G], with_attention=masked)
                teacher_maps, attention = out if masked else (out, None)
            else:
                # No-teacher ablation: the student's own global maps give targets (no grad) and references.
                teacher_maps, attention = student_maps[:G], None
        if masked:
            fg = teacher_foreground(attention, self.settings.mask_blur_padding)
        return self.objective(student_maps, teacher_maps, boxes, fg)

    def _optimizer_step(self) -> Optional[float]:
        step = self.state.step
        momentum = float(self.schedules.momentum[step])
        if self.settings.ema_timing == "before_step":
            ema_update(self.teacher, self.student, momentum)  # reference: teacher follows the pre-step student
        grad_norm = None
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.settings.ema_timing == "after_step":
            ema_update(self.teacher, self.student, momentum)
        self.state.step += 1
        return grad_norm

    def _no_sync(self, sync: bool):
        """DDP all-reduces gradients in backward; only the last micro-batch of an optimizer step needs it."""
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    def _loss_value(self, loss: torch.Tensor) -> float:
        # Host-device sync, once per micro-batch: a NaN must stop the run before it reaches the weights. With
        # several processes it is the mean over them, so all of them stop (or skip) together.
        return float(dist.all_reduce_mean(loss.detach()))

    def _stop_requested(self) -> bool:
        if self.should_stop is None:
            return False
        return dist.any_rank(bool(self.should_stop()), self.device)

    # ------------------------------------------------------------------------------------------------ fit
    def _evaluate(self, tag: str) -> None:
        if self.evaluator is None:
            return
        # An evaluator may ask for the teacher (the attention-map monitor reads the teacher's attention).
        network = self.teacher if getattr(self.evaluator, "model", "student") == "teacher" else self.student
        was_training = network.training
        network.eval()
        # An evaluation never moves training's random streams (a DataLoader draws its seed from torch's): the run
        # draws the same crops with any monitor or none, and at any monitoring frequency.
        streams = rng_state()
        try:
            metrics = self.evaluator(network.backbone, tag)
        finally:
            set_rng_state(streams)
            network.train(was_training)
        if metrics:
            record = {"step": self.state.step, "epoch": self.state.epoch}
            record.update({f"eval/{tag}/{k}": v for k, v in metrics.items()})
            self.logger.log(record)
            # Per-class values (".../class/<name>/...") go to the metrics log only; the console gets the rest.
            log.info("eval %s: %s", tag, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                    if isinstance(v, float) and "/class/" not in k))

    def fit(self) -> dict:
        settings = self.settings
        accumulate = settings.accumulate
        last_step = self.total_steps if settings.max_steps is None else min(self.total_steps, settings.max_steps)
        if self.state.step >= last_step:
            log.info("the run is already complete at step %d; nothing to do", self.state.step)
            return {"step": self.state.step}
        at_start = self.state.step == 0 and self.state.batch_in_epoch == 0
        if at_start and self.evaluator and settings.monitor_before_training:
            self._evaluate("before")
        self.student.train()
        self.teacher.eval()  # no dropout or stochastic depth; the teacher only moves by EMA
        batch_size = settings.batch_size
        bar = tqdm(total=last_step, initial=self.state.step, desc="train", unit="step",
                   disable=not settings.progress or not dist.is_main(), dynamic_ncols=True)
        window_loss, window_n, window_images, window_start = 0.0, 0, 0, time.perf_counter()
        last_loss = float("nan")
        stopped = False
        while self.state.step < last_step and self.state.epoch < settings.epochs and not stopped:
            self.sampler.set_epoch(self.state.epoch, start=self.state.batch_in_epoch * batch_size)
            micro = 0
            with batches_of(self.loader) as batches:
                for crops, boxes in batches:
                    if self.state.step >= last_step:
                        break
                    self.schedules.apply(self.optimizer, self.state.step)
                    crops = [c.to(self.device, non_blocking=True) for c in crops]
                    boxes = {k: v.to(self.device, non_blocking=True) for k, v in boxes.items()}
                    with self._no_sync(sync=(micro + 1) % accumulate == 0):
                        loss = self.compute_loss(crops, boxes)
                        value = self._loss_value(loss)
                        if not math.isfinite(value):
                            raise TrainingDiverged(
                                f"the loss became {value} at step {self.state.step} (epoch {self.state.epoch}); "
                                f"the run stopped and its last checkpoint in {self.run_dir / 'checkpoints'} is "
                                "intact. Lower optim.lr_backbone, set optim.grad_clip, or use precision=fp32.")
                        self.state.batch_in_epoch += 1
                        if value != 0.0:  # a zero loss (every pair masked out) is skipped as the reference does
                            self.scaler.scale(loss / accumulate).backward()
                            self._has_grads = True
                        elif settings.zero_loss_step == "hold":
                            continue  # skipped without counting: the schedules wait for the next step with a loss
                    micro += 1
                    window_loss, window_n = window_loss + value, window_n + 1
                    window_images += len(crops[0]) * dist.world_size()
                    last_loss = value
                    if micro % accumulate:
                        continue
                    if self._has_grads:
                        grad_norm = self._optimizer_step()
                    else:  # every micro-batch had a zero loss: no update, no EMA, but the step counts (METHOD.md §4.8)
                        grad_norm, self.state.step = None, self.state.step + 1
                    self._has_grads = False
                    bar.update(1)
                    if self.state.step % settings.log_every == 0 or self.state.step == last_step:
                        elapsed = time.perf_counter() - window_start
                        record = self._record(window_loss / max(window_n, 1), window_images / elapsed, grad_norm)
                        self.logger.log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr_backbone']:.2e}",
                                        img_s=f"{record['images_per_s']:.1f}")
                        window_loss, window_n, window_images, window_start = 0.0, 0, 0, time.perf_counter()
                    if settings.checkpoint_every and self.state.step % settings.checkpoint_every == 0:
                        self.save()
                    every_steps = settings.monitor_every_n_steps
                    if every_steps and self.state.step % every_steps == 0 and self.state.step < last_step:
                        self._evaluate(f"step{self.state.step}")
                    if self._stop_requested():  # e.g. SLURM's warning before the time limit: save here, requeue
                        log.info("stop requested at step %d: checkpointing", self.state.step)
                        stopped = True
                        break
                else:  # the epoch ran to its end
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    self.save()
                    every = settings.monitor_every_n_epochs
                    if every and self.state.epoch % every == 0 and self.state.epoch < settings.epochs:
                        self._evaluate(f"epoch{self.state.epoch}")
        bar.close()
        self.save()
        if stopped:
            return {"step": self.state.step, "loss": last_loss, "stopped": True}
        if self.evaluator and settings.monitor_after_training:
            self._evaluate("after")
        return {"step": self.state.step, "loss": last_loss}

    def _record(self, loss: float, images_per_s: float, grad_norm) -> dict:
        step = self.state.step - 1  # the values the last optimizer step used
        groups = {g["name"]: g for g in self.optimizer.param_groups}
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,
            "lr_backbone": groups.get("backbone_decay", groups.get("backbone_no_decay", {})).get("lr", 0.0),
            "lr_head": groups["head_decay"]["lr"] if "head_decay" in groups else 0.0,
            "wd": float(self.schedules.weight_decay[step]),
            "momentum": float(self.schedules.momentum[step]),
            "images_per_s": images_per_s,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        bad = bad_image_count(self.loader.dataset)  # unreadable images skipped so far (data.on_bad_image=skip)
        if bad:
            record["bad_images"] = bad
        return record
