"""Process groups from the torchrun or SLURM environment: DDP over NCCL on GPUs, gloo on the CPU.

    torchrun --nproc_per_node=8 -m neco.train ...      # RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT
    srun python -m neco.train ...                      # one task per GPU (e.g. a submitit job)

Outside both (a plain `python -m neco.train`, or a SLURM batch script without `srun`) nothing is initialised
and every helper here is the identity, so the single-process path is unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger("neco")

# Rank 0 alone evaluates and writes checkpoints while the others wait in the next collective; NCCL's default
# timeout (10 minutes) is shorter than a full evaluation.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("NECO_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "none"  # torchrun | slurm | none


def from_environment(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read rank, local rank, world size and the rendezvous address from the launcher's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, or anything else that speaks env://
        port = environ.get("MASTER_PORT")
        return DistEnv(int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), int(environ["WORLD_SIZE"]),
                       environ.get("MASTER_ADDR"), int(port) if port else None, "torchrun")
    # SLURM_STEP_NUM_TASKS exists only inside an `srun` step; a batch script's own shell has SLURM_NTASKS
    # too, but no other processes to meet, so it must stay single-process.
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in environ:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
        # Every task derives the same port from the job id, as submitit's TorchDistributedEnvironment does.
        port = environ.get("MASTER_PORT") or random.Random(environ["SLURM_JOB_ID"]).randint(20000, 60000)
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)), tasks,
                       environ.get("MASTER_ADDR") or _first_host(nodes), int(port), "slurm")
    return DistEnv()


def _first_host(node_list: str) -> str:
    """First host of a SLURM node list; `scontrol` (on every SLURM node) expands compressed lists such as
    `gpu[001-004,007]`."""
    if not any(c in node_list for c in "[,"):
        return node_list
    out = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True,
                         check=True)
    return out.stdout.split()[0]


_OWNED = False  # whether `init` created the process group (then `shutdown` destroys it)


def init(device_name: str) -> DistEnv:
    """Join the process group the environment describes. A no-op when there is none, or when the caller
    already made one (then it stays the caller's: `shutdown` leaves it alone)."""
    global _OWNED
    env = from_environment()
    if env.source == "none" or is_enabled():
        return env
    os.environ.update({"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank),
                       "WORLD_SIZE": str(env.world_size)})
    if env.master_addr:
        os.environ["MASTER_ADDR"] = env.master_addr
    if env.master_port:
        os.environ["MASTER_PORT"] = str(env.master_port)
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        # A task that sees all of its node's GPUs takes the one of its local rank; one that sees a single GPU
        # (gres binding) takes that one.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    tdist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                             timeout=TIMEOUT)
    _OWNED = True
    if env.rank != 0:
        log.setLevel(logging.WARNING)  # one copy of the progress messages, from rank 0
    log.info("distributed: %s, world size %d, backend %s, rendezvous %s:%s", env.source, env.world_size,
             backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return env


def shutdown() -> None:
    global _OWNED
    if is_enabled():
        tdist.barrier()  # rank 0 may still be saving or evaluating; leave together
        if _OWNED:
            tdist.destroy_process_group()
            _OWNED = False


def is_enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index means this process's GPU (set in `init`)."""
    if device.type == "cuda" and device.index is None and is_enabled():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def barrier() -> None:
    if is_enabled():
        tdist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a tensor (a copy; the input is left alone)."""
    if not is_enabled():
        return x
    x = x.detach().clone()
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x / tdist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on one: a stop request stops all of them at the same step."""
    if not is_enabled():
        return flag
    x = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return bool(x.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (picklable objects; tensors travel as CPU tensors)."""
    if not is_enabled():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def seed_ranks(seed: int) -> None:
    """Give each process its own random stream (crops, reference draws) once the shared models are built."""
    from neco.engine.setup import seed_everything

    seed_everything(seed + rank())


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the student; the caller keeps the unwrapped module for everything but
    the forward (state dicts, EMA, evaluation), so checkpoint keys never gain a `module.` prefix."""
    ids = [device.index] if device.type == "cuda" else None
    # No buffers to keep in step (timm ViTs have none that change); every trainable parameter reaches the
    # loss, so no search for unused parameters.
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)
