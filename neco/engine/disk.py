"""Writing the run directory: a full disk or an unwritable output folder is one line naming what to change."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Optional

from neco.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
# What torch.save raises when its own file writer fails (it does not keep the errno): a full disk above all.
TORCH_WRITE_FAILURE = ("inline_container.cc", "file write failed", "unexpected pos")
CHANGE = "free space there or set paths.output_dir (or hydra.run.dir) to another disk"


class OutputError(UserError):
    """The run directory cannot be written."""


def _free(folder: Path) -> str:
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return f"{shutil.disk_usage(candidate).free / 2**20:.0f} MiB free"
    return "free space unknown"


def is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in NO_SPACE + NOT_WRITABLE
    return isinstance(err, RuntimeError) and any(s in str(err) for s in TORCH_WRITE_FAILURE)


def write_error(err: BaseException, folder: Path, what: str, note: str = "") -> OutputError:
    """The one-line error for `err`, raised while writing `what` into `folder`; `note` says what was kept."""
    folder = Path(folder)
    if isinstance(err, OSError) and err.errno in NOT_WRITABLE:
        return OutputError(f"cannot write {what} in {folder}: {err.strerror}{note}; set paths.output_dir (or "
                           "hydra.run.dir) to a writable folder")
    reason = "" if isinstance(err, OSError) else f" (torch: {str(err).splitlines()[0]})"
    return OutputError(f"no space left on {folder} ({_free(folder)}) while writing {what}{reason}{note}; {CHANGE}")


@contextlib.contextmanager
def output_errors(run_dir: Path):
    """Turn a failed write into the run directory (metrics, config, figures) into a one-line OutputError."""
    run_dir = Path(run_dir).resolve()
    try:
        yield
    except OSError as err:
        target = Path(os.path.abspath(err.filename)) if isinstance(err.filename, str) else None
        inside = target is not None and (run_dir in (target, *target.parents) or target in run_dir.parents)
        if not is_write_failure(err) or not inside:
            raise
        raise write_error(err, target.parent, target.name) from None


def check_writable(folder: Path) -> Optional[str]:
    """None if `folder` can be created and written, else the reason (one line)."""
    folder = Path(folder)
    probe = folder / f".write_test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        where = err.filename or folder
        return f"cannot create or write the output folder {folder} ({err.strerror}: {where})"
    return None
