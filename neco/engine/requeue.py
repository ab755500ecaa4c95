"""SLURM's time-limit warning in a submitit job: checkpoint at the next optimizer step, then requeue.

Used by the training loop (`neco.train`) inside the job that `neco.launch` submits; lives apart from both so
that neither needs the other.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger("neco")


class DeferredRequeue:
    """Moves submitit's timeout/preemption handler to the next optimizer step.

    submitit's own handler runs as soon as the signal arrives, in the middle of whatever the step was doing,
    and requeues at once: the run would lose everything since its last periodic checkpoint. Here the signal
    only sets a flag; the trainer polls it after each optimizer step (all processes agree on the step),
    checkpoints, and then submitit's handler runs: it calls the job's `checkpoint()`, requeues the job and
    exits.
    Inactive (and harmless) outside a submitit job on SLURM.
    """

    def __init__(self) -> None:
        self.requested = False
        self._handler: Any = None
        self._signum: int | None = None

    @classmethod
    def install(cls) -> DeferredRequeue:
        guard = cls()
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return guard
        signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        previous = signal.getsignal(signum)
        if not callable(previous):  # submitit installs its handler before it calls the job
            return guard
        try:
            signal.signal(signum, guard._defer)
        except ValueError:  # signals can only be handled in the main thread
            return guard
        guard._handler, guard._signum = previous, signum
        return guard

    @property
    def active(self) -> bool:
        return self._handler is not None

    def __call__(self) -> bool:
        return self.requested

    def _defer(self, signum, frame) -> None:
        self.requested = True
        log.warning("received %s: checkpointing at the next optimizer step, then requeueing",
                    signal.Signals(signum).name)

    def uninstall(self) -> None:
        if self.active:
            signal.signal(self._signum, self._handler)

    def hand_over(self) -> None:
        """After the trainer stopped and saved: let submitit requeue the job (it exits this process)."""
        if self.active:
            self._handler(self._signum, None)
