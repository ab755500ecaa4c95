"""`python -m neco.train`: post-train a ViT with NeCo. Hydra composes the config from `conf/train.yaml`.

    python -m neco.train backbone=dinov2_vits14 data=coco          # the published ViT-S/14 recipe
    python -m neco.train experiment=quickstart                     # the embedded CPU demo
    python -m neco.train -m loss.student_steepness=10,100          # a sweep, one run directory per job
    torchrun --nproc_per_node=8 -m neco.train ...                  # DDP; SLURM tasks: see neco.launch
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import neco.config  # noqa: F401  (registers the config schema and resolvers)
import neco.help_texts  # noqa: F401  (the resolvers of `--help`)
from neco.cli import checked_command_line, exit_on_user_error
from neco.config import REFERENCE_OPTIONS
from neco.project import conf_dir

if TYPE_CHECKING:
    from neco.engine.requeue import DeferredRequeue
    from neco.engine.run_lock import RunLock
from neco.errors import UserError

# torch and everything built on it are imported inside the functions: `--help`, `--cfg job` and config errors
# answer before they load.

log = logging.getLogger("neco")


def _save_crops_figure(dataset, run_dir: Path) -> None:
    import torch

    from neco.viz import save_crops_figure

    with torch.random.fork_rng():  # the figure must not shift the random stream the training run sees
        crops, boxes = dataset[0]
    save_crops_figure(crops, boxes, run_dir / "figures" / "crops.png", title="multi-crop and pairwise boxes")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Build every component from `cfg`, resume if asked, and train. Returns the final step and loss, and
    `stopped` (the signal's name) when a signal stopped the run after a checkpoint."""
    from neco.engine import dist
    from neco.engine.disk import output_errors
    from neco.engine.setup import seed_everything

    run_dir = Path(run_dir)
    with output_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    dist.init(cfg.device)  # torchrun or SLURM tasks; nothing otherwise
    lock = _lock_run_dir(run_dir)
    try:
        with output_errors(run_dir):
            result, requeue = _train(cfg, run_dir, lock)
    finally:
        if lock is not None:
            lock.release()
    if result.get("stopped") and requeue.requested:
        requeue.hand_over()  # submitit calls the job's checkpoint(), requeues it and exits this process
    return result


def _lock_run_dir(run_dir: Path) -> Optional[RunLock]:
    """Rank 0 alone writes the run directory, so it alone takes the lock; every process learns the outcome."""
    from neco.engine import dist
    from neco.engine.disk import is_write_failure, write_error
    from neco.engine.run_lock import LOCK_NAME, RunLock, RunLocked

    lock, problem = None, None
    if dist.is_main():
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as err:
            problem = str(err)
        except OSError as err:  # e.g. a read-only run directory
            if not is_write_failure(err):
                raise
            problem = str(write_error(err, run_dir, LOCK_NAME))
    problem = dist.all_gather_objects(problem)[0]
    if problem:
        raise RunLocked(problem)
    if lock is not None and lock.taken_over:
        log.warning("took over the lock of %s", lock.taken_over)
    return lock


def _read_resume(cfg: DictConfig, run_dir: Path) -> tuple[Optional[Path], Optional[dict], dict]:
    """The checkpoint to resume from, its contents, and what this run changes (refused unless allowed)."""
    from neco.engine.checkpoint import find_checkpoint, load_checkpoint
    from neco.engine.fingerprint import check_resume, config_changes

    path = find_checkpoint(cfg.resume, run_dir)
    if path is None:
        return None, None, {}
    state = load_checkpoint(path)
    forced = check_resume(state, cfg, path, force=cfg.resume_force)
    record = {"checkpoint": str(path), "step": int(state["step"]),
              "changed": config_changes(state.get("config") or {}, cfg), "forced": forced}
    if forced:
        log.warning("resume_force=true: resuming %s with other settings: %s", path, forced)
    return path, state, record


def _write_run_files(cfg: DictConfig, run_dir: Path, info: dict, resume: dict, lock: Optional[RunLock]) -> None:
    """`config.yaml` and `run_info.json`; each resume adds an entry to the run's list of resumes."""
    from neco.engine.fingerprint import digest, fingerprint

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    previous = run_dir / "run_info.json"
    resumes = []
    if resume and previous.is_file():
        with contextlib.suppress(ValueError):
            resumes = json.loads(previous.read_text()).get("resumes", [])
    if resume:
        resumes.append(resume)
    info = info | {"fingerprint": digest(fingerprint(cfg)), "resume_force": cfg.resume_force, "resumes": resumes}
    if lock is not None and lock.taken_over:  # the stale lock of a process that died in this directory
        info["lock_taken_over"] = lock.taken_over
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def _train(cfg: DictConfig, run_dir: Path, lock: Optional[RunLock]) -> tuple[dict, DeferredRequeue]:
    from neco.engine import dist
    from neco.engine.checkpoint import set_aside_previous_run
    from neco.engine.log import MetricsLogger, environment_info, truncate_metrics
    from neco.engine.optim import build_optimizer, build_schedules, param_groups, select_trainable_blocks
    from neco.engine.requeue import DeferredRequeue
    from neco.engine.resolved import log_auto_choices, resolved_block
    from neco.engine.setup import build_loader, build_student_teacher, resolve_device, resolve_precision
    from neco.engine.signals import GracefulStop
    from neco.engine.trainer import Trainer
    from neco.engine.trainer_settings import TrainerSettings, run_record
    from neco.loss.neco import NeCoLoss
    from neco.loss.sorter_choice import resolve_sorter

    rank, world = dist.rank(), dist.world_size()
    main_process = dist.is_main()
    device = dist.local_device(resolve_device(cfg.device))
    amp_dtype = resolve_precision(cfg.precision, device)
    sorter = resolve_sorter(cfg.loss, device)  # loss.sorter=triton where it cannot run stops here
    # Before anything is built or written: a refused resume leaves the run directory as it was.
    checkpoint, resume_state, resume = _read_resume(cfg, run_dir)

    dataset, sampler, loader = build_loader(cfg.data, cfg.paths, cfg.seed, rank=rank, world_size=world)
    student, teacher = build_student_teacher(cfg.backbone, cfg.loss, cache_dir=cfg.paths.weights)
    if world > 1:
        # Built from the same seed, student and teacher are identical on every process; from here on each
        # process draws its own crops and references.
        dist.seed_ranks(cfg.seed)
    frozen = select_trainable_blocks(student.backbone, cfg.optim.trainable_blocks)
    student.to(device)
    teacher.to(device)
    if cfg.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    ddp = dist.wrap(student, device) if dist.is_enabled() else None
    crop_sizes = [cfg.data.global_size] * cfg.data.num_global + [cfg.data.local_size] * cfg.data.num_local
    # As the reference, the queue is kept per process: loss.queue_length / world rows each (METHOD.md §3.4).
    objective = NeCoLoss(cfg.loss, student.backbone.patch_size, crop_sizes, cfg.data.num_global,
                         cfg.data.batch_size, world_size=world, sorter=sorter.value).to(device)
    if cfg.loss.mask != "all" and not cfg.loss.use_teacher:
        raise UserError("loss.mask=fg|bg needs the teacher's attention: set loss.use_teacher=true or loss.mask=all")

    steps_per_epoch = len(loader) // cfg.optim.accumulate
    effective_batch = cfg.data.batch_size * cfg.optim.accumulate * world
    groups = param_groups(student.backbone, student.head, cfg.optim)
    if cfg.optim.scale_lr_with_batch:
        for g in groups:
            g["base_lr"] = g["lr"] = g["base_lr"] * effective_batch / 256
    optimizer = build_optimizer(groups, cfg.optim, device)
    schedules = build_schedules(cfg.optim, steps_per_epoch * cfg.optim.epochs)

    derived = {
        "num_images": len(dataset), "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * cfg.optim.epochs, "effective_batch": effective_batch,
        "world_size": world,
        "lr": {g["name"]: g["base_lr"] for g in groups}, "frozen_parameters": len(frozen),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
    }
    if main_process:  # rank 0 alone writes the run directory, logs, evaluates and checkpoints
        options = {key: OmegaConf.select(cfg, key) for key in REFERENCE_OPTIONS}
        resolved = resolved_block(cfg, device, amp_dtype, sorter, optimizer, student.backbone)
        log_auto_choices(resolved)
        info = environment_info(device, cfg.seed) | {"derived": derived, "reference_options": options,
                                                     "resolved": resolved}
        _write_run_files(cfg, run_dir, info, resume, lock)
    log.info("run directory: %s", run_dir)
    log.info("%d images, %d steps/epoch x %d epochs, effective batch %d (%d x %d accumulated x %d "
             "processes), lr %s", len(dataset), steps_per_epoch, cfg.optim.epochs, effective_batch,
             cfg.data.batch_size, cfg.optim.accumulate, world, derived["lr"])
    if cfg.max_steps is not None and cfg.max_steps < derived["total_steps"]:
        log.info("this run stops after max_steps=%d optimizer steps (%d images); the schedules still span the "
                 "%d steps above", cfg.max_steps, cfg.max_steps * effective_batch, derived["total_steps"])

    # The W&B id is stable across requeues (same run directory) and distinct for each job of a sweep.
    run_id = cfg.run_name if run_dir.name == cfg.run_name else f"{cfg.run_name}-{run_dir.name}"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    logger = MetricsLogger(run_dir, cfg.logger, plain, run_id=run_id) if main_process else _NoLogger()
    evaluator = None
    if cfg.monitor.name == "quick" and main_process:
        from neco.before_after import BeforeAfterEvaluator

        evaluator = BeforeAfterEvaluator(cfg, run_dir, device, amp_dtype, student, teacher, objective)
    elif cfg.monitor.name in ("kmeans", "attention") and main_process:
        from neco.eval.monitors import build_monitor

        # Built now, so that a missing evaluation dataset stops the run before the first step.
        evaluator = build_monitor(cfg.monitor, cfg.data, cfg.paths, device=device, amp_dtype=amp_dtype,
                                  progress=cfg.logger.progress, run_dir=run_dir)
    requeue = DeferredRequeue.install()  # in a submitit job: checkpoint at a step boundary, then requeue
    graceful = GracefulStop.install()  # SIGTERM, Ctrl-C: checkpoint at a step boundary, then exit
    try:  # the handlers are put back however the run ends (a refused resume included)
        trainer = Trainer(student=student, teacher=teacher, objective=objective, optimizer=optimizer,
                          schedules=schedules, loader=loader, sampler=sampler,
                          settings=TrainerSettings.from_config(cfg), run_record=run_record(cfg), run_dir=run_dir,
                          device=device, amp_dtype=amp_dtype, logger=logger, steps_per_epoch=steps_per_epoch,
                          evaluator=evaluator, ddp=ddp, should_stop=lambda: requeue() or graceful())
        if checkpoint is not None:
            trainer.load(checkpoint, resume_state)
            del resume_state
            if main_process:  # the steps after the checkpoint are logged again: drop their first records
                dropped = truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
                if dropped:
                    log.info("metrics.jsonl: dropped %d records after step %d", dropped, trainer.state.step)
        elif main_process:
            superseded = set_aside_previous_run(run_dir)
            if superseded:
                log.warning("starting from scratch: the earlier checkpoints and metrics of %s moved to %s", run_dir,
                            superseded)
            _save_crops_figure(dataset, run_dir)
        result = trainer.fit()
    finally:
        logger.close()
        graceful.uninstall()
        requeue.uninstall()
    if main_process and (run_dir / "metrics.jsonl").is_file():
        from neco.viz import plot_metrics

        plot_metrics(run_dir / "metrics.jsonl", run_dir / "figures" / "loss.png", keys=("loss",),
                     title=f"NeCo training loss, {cfg.run_name}")
        if not result.get("stopped"):
            from neco.summary import train_summary

            print("\n" + train_summary(run_dir), flush=True)
    dist.shutdown()
    if result.get("stopped"):
        result["stopped"] = "SIGUSR2" if requeue.requested else graceful.signal_name or "signal"
    return result, requeue


class _NoLogger:
    """What processes other than rank 0 log to."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@checked_command_line(neco.config.TrainConfig)
@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import torch

    from neco.engine.signals import abort_on_interrupt, exit_after_stop

    torch.set_float32_matmul_precision("high")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_user_error(), abort_on_interrupt(run_dir):
        result = train(cfg, run_dir)
    exit_after_stop(result, run_dir)  # SIGTERM or Ctrl-C: one line, exit 128 + the signal's number
    return result.get("loss", float("nan"))


if __name__ == "__main__":
    main()
