"""SLURM through submitit (marker `slurm`): against the real single-node cluster of launchers/local_slurm.sh.

Started here when it is not running and this is root; otherwise the tests fail (never skip): CI must not pass
without having run them. Launcher presets and the deferred requeue are checked without a cluster (default
suite).
"""

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY, tiny_cfg

from neco.engine.log import read_metrics
from neco.engine.trainer import Trainer
from neco.launch import compose_job, submit
from neco.train import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launchers" / "local_slurm.sh"
LOCAL = "hydra/launcher=local_cpu"
# 64 images / batch 2 = 32 steps in one epoch: long enough (20-40 s here) to requeue it in the middle.
LONG = [*TINY, "data.synthetic_images=64", "optim.epochs=1"]
LONG_STEPS = 32


@pytest.fixture(scope="session")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.fail("SLURM is not installed: apt-get install slurm-wlm munge, then "
                    "sudo launchers/local_slurm.sh start")
    started = False
    if subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            pytest.fail("the local SLURM cluster is not running: sudo launchers/local_slurm.sh start")
        subprocess.run([str(SCRIPT), "start"], check=True, capture_output=True, timeout=120)
        started = True
    logging.getLogger("submitit").setLevel(logging.ERROR)  # "sacct fails": no accounting on this cluster
    os.environ["OMP_NUM_THREADS"] = "1"  # the jobs inherit it: one thread per one-CPU job, deterministic
    yield
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def log_text(job) -> str:
    paths = job.paths
    return "".join(p.read_text() for p in (paths.stdout, paths.stderr) if p.is_file())


def wait(job, timeout: float = 600):
    """The job's result(s); cancels the job and fails with its log when it takes too long or fails."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)])
            pytest.fail(f"job {job.job_id} did not finish in {timeout} s:\n{log_text(job)[-4000:]}")
        time.sleep(1)
    try:
        results = job.results()
    except Exception as err:  # the job failed: show why
        pytest.fail(f"job {job.job_id} failed: {err}\n{log_text(job)[-4000:]}")
    return results[0] if len(results) == 1 else results


def wait_for_step(job, run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until the run has logged `step` (it is then training); returns the last logged step."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        last = max((m["step"] for m in read_metrics(metrics)), default=0) if metrics.is_file() else 0
        if last >= step:
            return last
        if job.done():
            break
        time.sleep(0.2)
    subprocess.run(["scancel", str(job.job_id)])
    pytest.fail(f"job {job.job_id} never reached step {step}:\n{log_text(job)[-4000:]}")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run the requeued ones must reproduce (submitted once, waited for when needed)."""
    out = tmp_path_factory.mktemp("reference")
    job, _ = submit([LOCAL, *LONG, "run_name=reference", f"paths.output_dir={out}"])
    return job


@pytest.mark.slurm
def test_quickstart_through_submitit(cluster, tmp_path):
    small_eval = ["monitor.name=quick", "monitor.train_images=8", "monitor.val_images=4", "monitor.image_size=32",
                  "monitor.num_figures=1"]
    job, run_dir = submit([LOCAL, *TINY, *small_eval, f"paths.output_dir={tmp_path}"])
    result = wait(job)
    assert run_dir == tmp_path / "runs" / "quickstart" and result["step"] == 8
    metrics = read_metrics(run_dir / "metrics.jsonl")
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == list(range(1, 9)) and losses[-1]["loss"] == result["loss"]
    assert any("eval/before/" in k for m in metrics for k in m)
    assert any("eval/after/" in k for m in metrics for k in m)
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slurm
def test_hydra_multirun_runs_as_a_job_array(cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neco.train", "-m", LOCAL, *TINY, "max_steps=2",
         "loss.student_steepness=10,100", f"paths.output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    sweep = tmp_path / "multirun" / "quickstart"
    # One job array of two tasks (submitit folders <array id>_<task>), each with its result.
    tasks = sorted(p for p in (sweep / ".submitit").iterdir() if "_" in p.name and p.is_dir())
    assert len(tasks) == 2 and len({t.name.split("_")[0] for t in tasks}) == 1, tasks
    for task, (num, steepness) in zip(tasks, (("0", "10.0"), ("1", "100.0")), strict=True):
        run = sweep / num
        assert f"student_steepness: {steepness}" in (run / "config.yaml").read_text()
        metrics = read_metrics(run / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2] and (run / "checkpoints" / "step_2.pt").is_file()
        outcome, job_return = pickle.loads((task / f"{task.name}_0_result.pkl").read_bytes())
        assert outcome == "success" and job_return.return_value == metrics[-1]["loss"]


@pytest.mark.slurm
def test_requeue_from_outside_resumes_from_the_last_checkpoint(cluster, tmp_path, reference):
    job, run_dir = submit([LOCAL, *LONG, "run_name=requeued", "checkpoint_every=1",
                           f"paths.output_dir={tmp_path}"])
    at = wait_for_step(job, run_dir, 4)
    assert at < LONG_STEPS, "the run finished before it could be requeued"
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    result, expected = wait(job), wait(reference)
    log = log_text(job)
    assert log.count(f"neco job {job.job_id} starts") == 2, log[-4000:]  # two starts of the same job
    assert "(restart 1)" in log and "resumed from" in log
    assert result["step"] == expected["step"] == LONG_STEPS
    assert result["loss"] == expected["loss"]  # same process layout and threads: bitwise the same run
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["loss"] == expected["loss"]


@pytest.mark.slurm
def test_time_limit_signal_checkpoints_at_a_step_and_requeues(cluster, tmp_path, reference):
    """USR2 (what SLURM sends `signal_delay_s` before the time limit): the run saves at the next step, its
    `checkpoint()` is called and submitit requeues it. No periodic checkpoints: only that save resumes it."""
    job, run_dir = submit([LOCAL, *LONG, "run_name=signalled", "checkpoint_every=0",
                           f"paths.output_dir={tmp_path}"])
    wait_for_step(job, run_dir, 4)
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    result, expected = wait(job), wait(reference)
    log = log_text(job)
    assert "stop requested at step" in log and "Calling checkpoint method" in log, log[-4000:]
    assert log.count(f"neco job {job.job_id} starts") == 2 and "resumed from" in log, log[-4000:]
    assert (result["step"], result["loss"]) == (expected["step"], expected["loss"])


@pytest.mark.slurm
def test_ddp_across_slurm_tasks(cluster, tmp_path):
    job, run_dir = submit([LOCAL, "hydra.launcher.tasks_per_node=2", *TINY, "max_steps=2",
                           "checkpoint_every=1", f"paths.output_dir={tmp_path}"])
    results = wait(job)
    assert [r["step"] for r in results] == [2, 2] and results[0]["loss"] == results[1]["loss"]
    assert "distributed: slurm, world size 2, backend gloo" in log_text(job)
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.pt", "step_1.pt", "step_2.pt"]


# ------------------------------------------------------------------------------ without a cluster (default)
@pytest.mark.parametrize("preset,gpus", [("slurm_1gpu", 1), ("slurm_4gpu", 4), ("slurm_8gpu", 8),
                                         ("local_cpu", None)])
def test_launcher_presets(preset, gpus, monkeypatch):
    monkeypatch.setenv("NECO_SLURM_PARTITION", "gpu-a100")
    cfg, run_dir, params = compose_job([f"hydra/launcher={preset}", "experiment=quickstart", "run_name=demo"])
    assert params["gpus_per_node"] == gpus and params["tasks_per_node"] == (gpus or 1)
    assert params["max_num_timeout"] > 0 and params["timeout_min"] > 0 and params["name"] == "demo"
    assert params["submitit_folder"] == str(run_dir / ".submitit" / "%j") and run_dir.name == "demo"
    assert params["partition"] == (None if preset == "local_cpu" else "gpu-a100")
    assert cfg["resume"] == "auto" and "hydra" not in cfg
    _, _, params = compose_job([f"hydra/launcher={preset}", "hydra.launcher.partition=big"])
    assert params["partition"] == "big"


def test_time_limit_signal_stops_at_a_step_boundary(tmp_path, monkeypatch):
    """In a submitit job the signal only marks the run; it stops after the step, saves, then hands over."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []

    def submitit_handler(signum, frame):  # stands for submitit's: checkpoint(), requeue, exit
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    original = Trainer._optimizer_step

    def step_then_signal(self):
        grad_norm = original(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)
        return grad_norm

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)
    try:
        result = train(tiny_cfg(tmp_path, "checkpoint_every=0"), tmp_path / "run")
        assert calls == [signal.SIGUSR2]  # submitit's handler ran once, after the save
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # put back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert result["step"] == 3 and result["stopped"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt", "step_3.pt"]


@pytest.mark.slurm
def test_evaluation_sweep_on_slurm_fills_one_results_table(cluster, tmp_path):
    """`python -m neco.eval -m` as a SLURM job array: each job writes its results.json and both append their rows
    to the shared table at about the same time."""
    proc = subprocess.run(
        [sys.executable, "-m", "neco.eval", "-m", LOCAL, "experiment=quickstart", "eval=quick",
         "eval.quick.train_images=16", "eval.quick.val_images=8", "eval.quick.image_size=48,64", "num_workers=0",
         "num_figures=2", "logger.progress=false", f"paths.output_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = sorted((tmp_path / "eval_multirun" / "quickstart").glob("*/*/results.json"))
    assert [p.parent.name for p in results] == ["0", "1"]
    rows = (tmp_path / "results" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("date,model") and len(rows) == 1 + 2 * 4  # 4 metrics per job
    assert sum('""image_size"":48' in r for r in rows) == 4 and sum('""image_size"":64' in r for r in rows) == 4
