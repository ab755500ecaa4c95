"""SIGTERM and Ctrl-C (SIGINT): finish the current optimizer step, checkpoint, and exit with one line.

A scheduler's SIGTERM (a time limit without warning, `scancel`, a node drained) and a first Ctrl-C only set a
flag; the trainer polls it after each optimizer step, saves there and returns. A second Ctrl-C aborts at once,
without saving (the last checkpoint stays as it was). SLURM's time-limit warning in a submitit job (USR2) is
handled by `neco.engine.requeue.DeferredRequeue`, which requeues the job after the same save.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Any, Optional

log = logging.getLogger("neco")

HANDLED = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Callable as the trainer's `should_stop`: true once SIGTERM or SIGINT arrived. `signal_name` says which."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> GracefulStop:
        guard = cls()
        for signum in HANDLED:
            try:
                guard._previous[signum] = signal.signal(signum, guard._handle)
            except ValueError:  # signals can only be handled in the main thread: keep the defaults
                break
        return guard

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
            return  # a repeated SIGTERM: the save is already on its way
        self.signal_name = name
        hint = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        log.warning("received %s: checkpointing after the current step, then exiting%s", name, hint)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


def exit_after_stop(result: dict, run_dir) -> None:
    """After a run stopped by a signal and saved: one line on stderr, then exit 128 + the signal's number, as a
    process killed by it would, so that a calling script (`make`, `&&`) does not carry on as if it had finished."""
    name = result.get("stopped")
    if name not in EXIT_STATUS:
        return
    print(f"stopped by {name} at step {result['step']}: checkpoint saved in {run_dir}/checkpoints; run the same "
          "command again to resume (resume=auto)", file=sys.stderr)
    sys.exit(EXIT_STATUS[name])


@contextlib.contextmanager
def abort_on_interrupt(run_dir):
    """A second Ctrl-C (or one outside the training loop) ends the process with one line and status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"aborted by Ctrl-C: nothing more was saved; the last checkpoint in {run_dir}/checkpoints is intact",
              file=sys.stderr)
        sys.exit(EXIT_STATUS["SIGINT"])


def ignore_in_workers(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: loader processes leave SIGINT and SIGTERM to the training process (they get
    them too, from a terminal or a scheduler), which stops after the step it is on and then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
