"""An exclusive lock on a run directory: one training process writes its checkpoints and metrics at a time.

The lock is the file `<run_dir>/.lock`, created with O_EXCL and holding its owner (host, pid, process start
time, SLURM job). The owner also holds `flock` on it where the filesystem supports it, so that on one machine a
dead owner's lock is free at once. Some network filesystems ignore `flock`; there the holder's record decides:
the lock of a process that no longer runs on this host is taken over, and so is the lock of an earlier start of
the same SLURM job (a requeued job restarts only once its previous run has ended, possibly on another node).
A live or unknown holder is never displaced: the run stops with a message naming it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from neco.errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live process trains in the same run directory."""


def process_start_time(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": process_start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "since": time.time()}


def stale_reason(holder: dict, me: dict) -> Optional[str]:
    """Why `holder`'s lock may be taken over by `me`, or None when the holder may still be running."""
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return f"an earlier start of SLURM job {job}"
    if holder.get("host") != me["host"]:
        return None  # a process on another machine: nothing here can tell whether it still runs
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return f"process {pid} no longer runs"
    started = holder.get("start_time")
    if started is not None and process_start_time(pid) not in (None, started):
        return f"process {pid} no longer runs (its pid was reused)"
    return None


def _flock(fd: int) -> Optional[bool]:
    """True: locked; False: another open file holds it; None: this filesystem does not support flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 65536).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, me: dict) -> None:
    data = json.dumps(me).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file `fd` has open (its owner may have removed it in between)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """`with RunLock(run_dir): ...` or `acquire()` / `release()`. `taken_over` says whose stale lock it replaced."""

    def __init__(self, run_dir: Path, *, wait_s: float = 2.0):
        self.path = Path(run_dir) / LOCK_NAME
        self.wait_s = wait_s  # how long a lock file without an owner record counts as being written
        self.fd: Optional[int] = None
        self.taken_over: Optional[dict] = None

    def acquire(self) -> RunLock:
        me = this_process()
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # released in between: try to create it again
                    continue
                created = False
            locked = _flock(fd)
            if locked is not False and not _same_file(fd, self.path):
                os.close(fd)  # the owner removed it after we opened it: start over on the new file
                continue
            holder = None if created else _read_holder(fd)
            if locked is False or (holder is not None and stale_reason(holder, me) is None):
                os.close(fd)
                if holder is None and time.monotonic() < deadline:  # its owner is writing its record
                    time.sleep(0.05)
                    continue
                raise RunLocked(self.message(holder))
            if holder is None and not created and time.monotonic() < deadline:
                os.close(fd)  # created an instant ago, its owner's record not yet written
                time.sleep(0.05)
                continue
            if holder is not None:
                self.taken_over = holder | {"reason": stale_reason(holder, me)}
            _write_holder(fd, me)
            self.fd = fd
            return self

    def live_holder(self) -> Optional[dict]:
        """The record of the live process holding the lock, or None (free, or stale); changes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is False:
                return holder or {}
            return holder if holder is not None and stale_reason(holder, this_process()) is None else None
        finally:
            os.close(fd)

    def message(self, holder: Optional[dict]) -> str:
        run_dir = self.path.parent
        if not holder:
            who = "another process"
        else:
            job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
            who = f"process {holder.get('pid')} on host {holder.get('host')}{job}"
        return (f"the run directory {run_dir} is in use by {who} (lock file {self.path}); wait for it to finish, "
                f"or train in another directory (run_name=... or paths.output_dir=...). If that process is "
                f"gone, delete {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        # Remove the file while still holding flock, so that nobody takes over a lock that is being removed.
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
