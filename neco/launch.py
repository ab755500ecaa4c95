"""`python -m neco.launch`: one long training run on SLURM, submitted with one command, that requeues itself.

    python -m neco.launch hydra/launcher=slurm_8gpu experiment=small/neco_dinov2 paths.coco=/data/coco/images
    python -m neco.launch hydra/launcher=slurm_1gpu hydra.launcher.partition=gpu hydra.launcher.nodes=2

Every argument is a Hydra override of `conf/train.yaml`; the resources come from the same `hydra/launcher`
presets as sweeps (`conf/hydra/launcher/`, default `slurm_1gpu`). The run is a submitit job (one task per GPU,
DDP across them). SLURM warns it `signal_delay_s` before its time limit (USR2; a preemption that sends USR2
is handled the same way): the run checkpoints at the next optimizer step, `TrainJob.checkpoint` hands
submitit the same job again and submitit requeues it, at most `max_num_timeout` times. A job ended with SIGTERM
(`scontrol requeue`, `scancel`) also saves at the next optimizer step when the step and the save fit in SLURM's
KillWait (neco.engine.signals); one killed without warning (a node failure) restarts from its last periodic
checkpoint (`checkpoint_every`). The requeued job runs the same resolved config; its run directory depends only
on that config, so `resume=auto` continues from `checkpoints/last.pt`, with the same W&B run id, and takes over
the run directory's lock from its earlier start (neco.engine.run_lock).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from neco.project import conf_dir

log = logging.getLogger("neco")

CONF = conf_dir()
DEFAULT_LAUNCHER = "slurm_1gpu"


class TrainJob:
    """The submitted callable: trains with a resolved config in a fixed run directory."""

    def __init__(self, cfg: dict, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir

    def __call__(self) -> dict:
        from omegaconf import OmegaConf

        from neco.engine.signals import exit_after_stop
        from neco.train import train

        if not log.handlers:  # the run's progress in submitit's log files, as neco.train prints it
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        log.info("neco job %s starts (restart %d) in %s", os.environ.get("SLURM_JOB_ID"), restarts,
                 self.run_dir)
        cfg = OmegaConf.create(self.cfg)
        if restarts and (Path(self.run_dir) / "checkpoints" / "last.pt").is_file():
            cfg.resume = "auto"  # a restarted job continues its own run, whatever `resume` first pointed at
        result = train(cfg, Path(self.run_dir))
        # Stopped by SIGTERM (`scontrol requeue`, `scancel`, a preemption) after saving: exit without a result,
        # as the killed job would have, so that submitit does not report the requeued job as finished.
        exit_after_stop(result, self.run_dir)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on timeout or preemption: the same job again (the trainer has just saved)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.run_dir), *args, **kwargs)


def compose_job(overrides: list[str]) -> tuple[dict, Path, dict]:
    """Resolved training config, run directory and launcher parameters for `overrides`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    import neco.config  # noqa: F401  (schema and resolvers)

    if not any(o.startswith(("hydra/launcher=", "+hydra/launcher=")) for o in overrides):
        overrides = [f"hydra/launcher={DEFAULT_LAUNCHER}", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="neco_launch"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        raise SystemExit("error: neco.launch submits to SLURM: choose a SLURM preset, e.g. "
                         "hydra/launcher=slurm_1gpu")
    run_dir = Path(str(cfg.hydra.run.dir)).resolve()
    with open_dict(launcher):
        launcher.submitit_folder = str(run_dir / ".submitit" / "%j")
        launcher.name = str(cfg.run_name)
    params = OmegaConf.to_container(launcher, resolve=True)
    with open_dict(cfg):
        del cfg["hydra"]
    # A value the user must give (e.g. backbone.weights=???) fails here rather than in the job.
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True), run_dir, params


def make_executor(params: dict):
    """A submitit executor from a `hydra/launcher` preset, mapped exactly as hydra-submitit-launcher does."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = dict(params)
    params.pop("_target_", None)
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor


def submit(overrides: list[str]):
    """Submit one training run: (submitit job, run directory). `job.result()` waits for the final step."""
    cfg, run_dir, params = compose_job(overrides)
    return make_executor(params).submit(TrainJob(cfg, str(run_dir))), run_dir


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
    from submitit.core.utils import FailedJobError

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from neco.help_texts import launch_help

        print(launch_help())
        return
    wait = "--wait" in args
    try:
        job, run_dir = submit([a for a in args if a != "--wait"])
    except MissingMandatoryValue as err:
        _fail(f"{err.full_key} must be set for this configuration (e.g. {err.full_key}=/path/to/file)")
    except (HydraException, OmegaConfBaseException) as err:  # a mistyped override: one line, no trace
        _fail(str(err))
    except FailedJobError as err:  # sbatch refused the job (partition, account, resources)
        _fail(f"SLURM refused the job; change hydra.launcher.* accordingly: {err}")
    print(f"submitted job {job.job_id}\n  run directory: {run_dir}\n  logs: {job.paths.stdout}")
    if wait:
        print(f"result: {job.result()}")


if __name__ == "__main__":
    main()
