"""Faults that used to lose or mix a run's work: SIGTERM and Ctrl-C, two processes in one run directory.

Each test injects the fault (a real signal, a real second process, a dead lock holder) into the tiny training
run of tests/test_train.py and checks what is left on disk.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_slurm import LOCAL, log_text, wait
from test_slurm import cluster as cluster  # the SLURM fixture
from test_slurm import wait_for_step as wait_for_job_step
from test_train import TINY, tiny_cfg

from neco.engine import run_lock
from neco.engine.checkpoint import save_checkpoint, temporary_name
from neco.engine.log import read_metrics
from neco.engine.run_lock import RunLock, RunLocked
from neco.engine.signals import abort_on_interrupt
from neco.engine.trainer import Trainer
from neco.launch import submit
from neco.train import train

ROOT = Path(__file__).resolve().parents[1]
# 32 images / batch 2 = 16 steps in one epoch: long enough to be signalled in the middle from outside.
LONG = [*TINY, "data.synthetic_images=32", "optim.epochs=1"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def signal_at_step(monkeypatch, step: int, *signums: int) -> None:
    """Send `signums` to this process right after optimizer step `step`, as a user or scheduler would."""
    original = Trainer._optimizer_step

    def step_then_signal(self):
        grad_norm = original(self)
        if self.state.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return grad_norm

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)


def start_train(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neco.train", *LONG, f"paths.output_dir={tmp_path}", *overrides],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the run never reached step {step}: {proc.communicate()[1][-3000:]}")


# -------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_the_step_and_resume_reproduces_the_run(tmp_path, monkeypatch, signum):
    full = train(tiny_cfg(tmp_path, "run_name=full", "checkpoint_every=0"), tmp_path / "full")

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal_at_step(monkeypatch, 3, signum)
    stopped = train(tiny_cfg(tmp_path, "run_name=part", "checkpoint_every=0"), tmp_path / "part")
    assert stopped["stopped"] == signal.Signals(signum).name and stopped["step"] == 3
    # No periodic checkpoints: only the save on the signal can resume the run at step 3.
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["last.pt", "step_3.pt"]
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back
    assert not (tmp_path / "part" / ".lock").exists()

    monkeypatch.undo()
    resumed = train(tiny_cfg(tmp_path, "run_name=part", "checkpoint_every=0"), tmp_path / "part")
    assert resumed["step"] == full["step"] == 8 and "stopped" not in resumed
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == list(range(1, 9))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise: num_workers=0 on the CPU


def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path, monkeypatch, capsys):
    signal_at_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info, abort_on_interrupt(tmp_path / "run"):
        train(tiny_cfg(tmp_path, "checkpoint_every=0"), tmp_path / "run")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aborted by Ctrl-C: nothing more was saved")
    assert not (tmp_path / "run" / "checkpoints").exists()  # the first Ctrl-C's save never happened
    assert not (tmp_path / "run" / ".lock").exists()  # but the lock was released
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_from_outside_exits_with_one_line_after_a_checkpoint(tmp_path):
    proc = start_train(tmp_path, "checkpoint_every=0")
    run = tmp_path / "runs" / "quickstart"
    wait_for_step(proc, run / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and "resume=auto" in last, err[-3000:]
    step = int(last.split("at step ")[1].split(":")[0])
    assert 2 <= step < 16
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == step
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == step


# ----------------------------------------------------------------------------------------------- lock
@pytest.fixture
def holder(tmp_path):
    """Another live process that holds the lock of tmp_path/run."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from neco.engine.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_process_in_a_locked_run_directory_stops_naming_the_holder(tmp_path, holder):
    with pytest.raises(RunLocked) as err:
        train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")
    message = str(err.value)
    assert f"process {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message
    assert "run_name=" in message  # what to change
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written

    holder.kill()  # dies without releasing: its lock file stays behind
    holder.wait()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == holder.pid
    train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["lock_taken_over"]["pid"] == holder.pid and "no longer runs" in info["lock_taken_over"]["reason"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_two_runs_started_together_in_one_directory(tmp_path):
    """Two `make quickstart` of the same name at once: one trains, the other stops at once with exit 2.

    Both are started before either has taken the lock; the first is kept running (a long run stopped by SIGTERM
    once the second has ended) so that the two always overlap, however slowly either starts."""
    procs = [start_train(tmp_path, "max_steps=100000") for _ in range(2)]
    run = tmp_path / "runs" / "quickstart"
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    refused_proc = next((p for p in procs if p.poll() is not None), None)
    assert refused_proc is not None, "neither run stopped"
    ok_proc = next(p for p in procs if p is not refused_proc)
    refused, refused_err = refused_proc.wait(), refused_proc.communicate()[1]
    assert refused == 2 and "Traceback" not in refused_err, refused_err[-3000:]
    line = refused_err.strip().splitlines()[-1]
    assert line.startswith("error: the run directory") and f"on host {socket.gethostname()}" in line
    assert str(ok_proc.pid) in line
    wait_for_step(ok_proc, run / "metrics.jsonl", 2)
    ok_proc.send_signal(signal.SIGTERM)
    assert ok_proc.wait(timeout=300) == 128 + signal.SIGTERM, ok_proc.communicate()[1][-3000:]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("holder_record,taken", [
    ({"pid": "live", "host": "here"}, False),
    ({"pid": "dead", "host": "here"}, True),
    ({"pid": "live", "host": "here", "start_time": -1}, True),  # the pid now belongs to another process
    ({"pid": "dead", "host": "gpu-node-7"}, False),  # another machine: cannot tell, never displaced
    ({"pid": "dead", "host": "gpu-node-7", "slurm_job_id": "42", "slurm_restart": 0}, True),  # requeued job
    ({"pid": "dead", "host": "gpu-node-7", "slurm_job_id": "41", "slurm_restart": 0}, False),
])
def test_stale_lock_without_flock(tmp_path, monkeypatch, holder_record, taken):
    """On a filesystem that ignores flock (NFS) the holder's record decides."""
    monkeypatch.setattr(run_lock, "_flock", lambda fd: None)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pids = {"live": os.getpid(), "dead": int(dead.stdout)}
    record = holder_record | {"pid": pids[holder_record["pid"]]}
    record["host"] = socket.gethostname() if record["host"] == "here" else record["host"]
    if "start_time" not in record:
        record["start_time"] = run_lock.process_start_time(record["pid"])
    (tmp_path / ".lock").write_text(json.dumps(record))
    lock = RunLock(tmp_path, wait_s=0.1)
    if taken:
        with lock:
            assert lock.taken_over["pid"] == record["pid"]
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert not (tmp_path / ".lock").exists()
    else:
        with pytest.raises(RunLocked, match=f"process {record['pid']} on host {record['host']}"):
            lock.acquire()
        assert json.loads((tmp_path / ".lock").read_text()) == record  # left as it was


def test_checkpoint_temporary_files_are_per_process(tmp_path, monkeypatch):
    """Another process's half-written file of the same checkpoint is neither reused nor removed."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    foreign = [folder / ".step_2.pt.othernode.4242.tmp", folder / ".last.pt.othernode.4242.tmp"]
    for f in foreign:
        f.write_bytes(b"half written")
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (written.append(Path(f).name), real_save(obj, f)))
    save_checkpoint({"step": 2, "student": {}}, tmp_path, 2, keep=3)
    assert written == [temporary_name(folder / "step_2.pt").name]
    assert str(os.getpid()) in written[0] and socket.gethostname() in written[0]
    assert all(f.read_bytes() == b"half written" for f in foreign)
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2


def test_quickstart_run_names_differ_within_one_second():
    names = []
    for _ in range(2):
        out = subprocess.run(["make", "-n", "quickstart", f"VENV={Path(sys.executable).parents[1]}"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        names.append(out.split("run_name=")[1].split()[0])
    assert names[0] != names[1] and all(n.startswith("quickstart-") for n in names)


@pytest.mark.ddp
def test_locked_run_directory_stops_every_process_of_a_distributed_run(tmp_path, holder):
    """Only rank 0 takes the lock; the other ranks learn the outcome and stop too instead of waiting forever."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "neco.train",
           *TINY, "max_steps=1", f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: the run directory")]
    # Rank 0 refuses before Hydra starts the run (neco.engine.preflight); torchrun then ends rank 1, or rank 1
    # learns the outcome from rank 0 and says so itself: either way no process waits and no process trains.
    assert errors and all(f"process {holder.pid} on host" in e for e in errors), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_locked_run_directory_from_the_command_line_writes_nothing(tmp_path, holder):
    proc = subprocess.run([sys.executable, "-m", "neco.train", *TINY, "max_steps=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by process {holder.pid} on host {socket.gethostname()}" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # no .hydra/ either


def test_run_directory_on_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "run" / ".lock"))

    monkeypatch.setattr(run_lock.os, "open", read_only)
    with pytest.raises(RunLocked, match=r"cannot write .lock in .*run: Read-only file system; set paths.output_dir"):
        train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")


def test_sigterm_in_a_submitit_job_saves_and_exits_without_a_result(tmp_path, monkeypatch):
    """`scontrol requeue` or a preemption sends SIGTERM: the job saves at the step and exits as killed, so that
    submitit writes no result and waits for the requeued start instead of reporting the job as finished."""
    from omegaconf import OmegaConf

    from neco.launch import TrainJob

    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    job = TrainJob(OmegaConf.to_container(tiny_cfg(tmp_path, "checkpoint_every=0"), resolve=True),
                   str(tmp_path / "run"))
    handlers = list(logging.getLogger("neco").handlers)
    try:
        with pytest.raises(SystemExit) as exit_info:
            job()
    finally:  # the job adds a console handler, as in submitit's log files
        logging.getLogger("neco").handlers[:] = handlers
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.slurm
def test_requeued_job_takes_over_the_lock_of_its_killed_start(cluster, tmp_path):
    """A start killed outright (SIGKILL: no save, no unlock) and then requeued: the new start takes over the
    lock its predecessor left and resumes from the last periodic checkpoint."""
    job, run_dir = submit([LOCAL, *LONG, "run_name=killed", "checkpoint_every=2", f"paths.output_dir={tmp_path}"])
    wait_for_job_step(job, run_dir, 4)
    killed = json.loads((run_dir / ".lock").read_text())  # the training process (this machine is the node)
    os.kill(killed["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", str(job.job_id)], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the killed job did not end"
        time.sleep(0.5)
    assert json.loads((run_dir / ".lock").read_text()) == killed  # left behind
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    result = wait(job)
    log = log_text(job)
    assert "(restart 1)" in log and "took over the lock" in log, log[-4000:]
    assert result["step"] == 16
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["lock_taken_over"]["pid"] == killed["pid"]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 17))
