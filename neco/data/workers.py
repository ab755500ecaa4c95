"""How many loader processes a machine can use: never more than the CPUs this process may run on."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

log = logging.getLogger("neco")
_reported: set[tuple[str, int, int]] = set()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a SLURM or container limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def cap_workers(requested: int, key: str = "data.num_workers") -> int:
    """``requested`` loader processes, at most one per available CPU; the cap is logged once per value.

    ``key``: the setting the log line names (``num_workers`` for ``python -m neco.eval``).

    More workers than CPUs only adds contention (and PyTorch warns about it). The cap is logged because the
    random crops a worker draws depend on how many workers share the stream.
    """
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (key, requested, cpus) not in _reported:
        _reported.add((key, requested, cpus))
        log.info("%s=%d capped at %d: the CPUs available to this process (set %s to at most %d to silence "
                 "this)", key, requested, cpus, key, cpus)
    return cpus


@contextlib.contextmanager
def batches_of(loader: Iterable) -> Iterator[Iterator]:
    """Iterate ``loader``; its worker processes end with the block, however the block ends.

    An error raised in a worker (an unreadable image with data.on_bad_image=raise) or in the step keeps the
    iterator alive in the traceback until the interpreter exits, and Python's exit handler then waits for the
    workers after a SIGTERM they ignore (neco.engine.signals.ignore_in_workers): the process would never end.
    Closing the iterator here asks the workers to stop through the loader's own queues instead.
    """
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # only multi-process loaders have workers
        if shutdown is not None:
            shutdown()
