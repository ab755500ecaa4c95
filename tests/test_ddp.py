"""DDP under `torchrun` with gloo on the CPU (marker `ddp`); the launchers' environments (default suite).

The torchrun tests start tests/ddp_worker.py in two processes on the tiny training run of tests/test_train.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY, tiny_cfg

from neco.engine import dist
from neco.engine.log import read_metrics
from neco.engine.trainer import Trainer
from neco.train import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"


def torchrun(mode: str, tmp_path: Path, *overrides: str, nproc: int = 2) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    # --standalone picks a free rendezvous port; one thread per process, as on a shared two-core machine.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), mode, str(out), str(tmp_path / "run"), *TINY, f"paths.output_dir={tmp_path}",
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.ddp
def test_two_processes_train_and_only_rank0_writes(tmp_path):
    reports = torchrun("train", tmp_path, "max_steps=2", "checkpoint_every=1")
    assert [r["world"] for r in reports] == [2, 2]
    assert [r["result"]["step"] for r in reports] == [2, 2]
    assert reports[0]["result"]["loss"] == reports[1]["result"]["loss"]  # the all-reduced mean
    # Each process reads its own half of the epoch.
    first, second = (set(r["images"]) for r in reports)
    assert not first & second and len(first | second) == 8
    # Different images, same models after two steps: the gradients were averaged across processes.
    assert reports[0]["weights"] == reports[1]["weights"]
    # Checkpoints written once, by rank 0; one metrics line per step.
    assert reports[0]["saves"] == [1, 2] and reports[1]["saves"] == []
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_1.pt", "step_2.pt"]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["student"])  # the unwrapped student's keys
    assert len(ckpt["ranks"]) == 2
    derived = json.loads((run / "run_info.json").read_text())["derived"]
    assert derived["effective_batch"] == 2 * 1 * 2 and derived["world_size"] == 2


@pytest.mark.ddp
def test_gradients_equal_the_single_process_run(tmp_path, monkeypatch):
    """Same batch and same references on both ranks: DDP's averaged gradients are the single-process ones.
    Two micro-batches per step, so the first backward runs under no_sync; a queue of references, which
    holds queue_length / world_size rows per process."""
    common = ["max_steps=1", "optim.accumulate=2", "loss.references=queue"]
    reports = torchrun("grads", tmp_path, *common, "loss.queue_length=256")
    ddp = [torch.load(tmp_path / "out" / f"grads_rank{r}.pt", weights_only=True) for r in range(2)]

    single: dict = {}
    original = Trainer._optimizer_step

    def capture(self):
        if not single:
            single.update({n: p.grad.detach().clone() for n, p in self.student.named_parameters()
                           if p.grad is not None})
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", capture)
    torch.set_num_threads(1)  # as the torchrun processes
    result = train(tiny_cfg(tmp_path, *common, "loss.queue_length=128"), tmp_path / "single")

    assert set(ddp[0]) == set(single) and len(single) > 10
    for name, grad in single.items():
        assert torch.equal(ddp[0][name], ddp[1][name]), name  # DDP left both ranks the same gradient
        torch.testing.assert_close(ddp[0][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert reports[0]["result"]["loss"] == pytest.approx(result["loss"], rel=1e-6)


@pytest.mark.ddp
def test_distributed_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Per-process queues and random streams are saved by rank 0 and restored on each rank."""
    torchrun("resume", tmp_path, "checkpoint_every=1", "loss.references=queue", "loss.queue_length=128")
    full, part = tmp_path / "run" / "full", tmp_path / "run" / "part"
    losses = [[m["loss"] for m in read_metrics(d / "metrics.jsonl")] for d in (full, part)]
    assert len(losses[0]) == 4 and losses[1] == losses[0]
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for r in range(2):
        assert torch.equal(a["ranks"][r]["objective"]["queue"], b["ranks"][r]["objective"]["queue"])
    assert not torch.equal(a["ranks"][0]["objective"]["queue"], a["ranks"][1]["objective"]["queue"])


# ---------------------------------------------------------------------- environment parsing (default suite)
def test_torchrun_environment():
    env = dist.from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1",
                                 "MASTER_PORT": "29500", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"})
    assert env == dist.DistEnv(3, 1, 8, "n1", 29500, "torchrun")  # torchrun inside a SLURM job wins


def test_slurm_task_environment():
    slurm = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu7", "SLURM_JOB_NODELIST": "gpu7"}
    env = dist.from_environment(slurm)
    assert (env.rank, env.local_rank, env.world_size, env.source) == (5, 1, 8, "slurm")
    assert env.master_addr == "gpu7"
    assert 20000 <= env.master_port <= 60000 and dist.from_environment(slurm).master_port == env.master_port
    # The batch script's own shell (no srun step) has SLURM_NTASKS but no peers: a single process.
    batch = {k: v for k, v in slurm.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    assert dist.from_environment(batch).source == "none"
    assert dist.from_environment({}) == dist.DistEnv()


def test_helpers_are_the_identity_in_a_single_process():
    x = torch.tensor([1.5])
    assert not dist.is_enabled() and dist.is_main() and dist.world_size() == 1
    assert dist.all_reduce_mean(x) is x and dist.any_rank(True, x.device)
    assert dist.all_gather_objects(3) == [3]
