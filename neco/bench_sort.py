"""The sorter timings of `python -m neco.bench`, and the device helpers its step benchmark shares.

One sort of NeCo's size (3,136 rows of 49: 64 images x 49 cells, steepness 100, cauchy), forward + backward
against a random upstream gradient of the permutation matrices, and forward alone without grad; median of
CUDA-event timings, and the peak memory one call adds. Implementations: `sparse` (`diff_sort`), `dense`
(`diff_sort_dense`), `triton` (`triton_diff_sort`, its default exchange, and the other exchange as
`triton_<name>`; CUDA only), `diffsort` 0.2.0 when importable, `sparse_compiled` with `--compile-sort`.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from functools import partial

import torch

from neco.loss.sorting import diff_sort, diff_sort_dense

SORT_TARGET_MS = {"bitonic": 1.0, "odd_even": 3.0}  # one sort, forward + backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: a host timer must see the device work finished


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def failure(err: Exception) -> str:
    traceback.print_exc()  # the whole story goes to the log; the JSON line names the failure
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the Triton sorter gets no timing on `device`, or None when it does."""
    if device.type != "cuda":
        # The interpreter (TRITON_INTERPRET=1) runs them on a CPU, but it is a correctness tool, not a timing.
        return f"the Triton kernels need a CUDA device, this run is on {device.type}"
    from neco.loss.triton_sort import unavailable_reason

    return unavailable_reason(device)


def _median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # host-device sync: read this repetition's time
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory one call adds over what was allocated before it."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def sorters(network: str, n: int, steepness: float, device: torch.device, compiled: bool) -> dict:
    """name -> (callable of a (rows, n) tensor returning (values, matrix), exchange or None)."""

    def sparse(x):
        return diff_sort(x, network, steepness)

    if compiled:
        return {"sparse_compiled": (torch.compile(sparse), None)}
    impls = {"sparse": (sparse, None), "dense": (lambda x: diff_sort_dense(x, network, steepness), None)}
    if triton_skip_reason(device) is None:
        from neco.loss.triton_sort import DEFAULT_EXCHANGE, EXCHANGES, triton_diff_sort

        for exchange in sorted(EXCHANGES, key=lambda e: e != DEFAULT_EXCHANGE):  # the default first
            name = "triton" if exchange == DEFAULT_EXCHANGE else f"triton_{exchange}"
            impls[name] = (partial(triton_diff_sort, network=network, steepness=steepness, exchange=exchange),
                           exchange)
    try:
        from diffsort import DiffSortNet

        impls["diffsort"] = (DiffSortNet(network, n, device=device, steepness=steepness, distribution="cauchy"),
                             None)
    except ImportError:
        pass
    return impls


def measure_sorts(args, device: torch.device, compiled: bool) -> list[dict]:
    rows, n, steepness = args.sort_rows, 49, 100.0
    x0 = torch.randn(rows, n, device=device)
    grad = torch.randn(rows, n, n, device=device)  # a random upstream gradient for the permutation matrices
    records = []
    for network in ("bitonic", "odd_even"):
        impls = sorters(network, n, steepness, device, compiled)
        for name, (fn, exchange) in impls.items():

            def fwd_bwd(fn=fn):
                x = x0.clone().requires_grad_(True)
                fn(x)[1].backward(grad)

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(x0)

            record = {"kind": "sort", "impl": name, "network": network, "rows": rows, "n": n,
                      "steepness": steepness, "distribution": "cauchy", "warmup": args.sort_warmup,
                      "reps": args.sort_reps}
            if exchange:
                record["exchange"] = exchange
            try:
                # The warm-up calls also compile the Triton kernels, so the timed ones never do.
                record["fwd_bwd_ms"] = _median_ms(fwd_bwd, device, args.sort_warmup, args.sort_reps)
                record["fwd_ms"] = _median_ms(fwd, device, args.sort_warmup, args.sort_reps)
                record["peak_mib"] = _extra_mib(fwd_bwd, device)
                record["fwd_peak_mib"] = _extra_mib(fwd, device)
            except Exception as err:
                record["error"] = failure(err)
            fresh_memory(device)
            records.append(record)
    reason = triton_skip_reason(device)
    if reason and not compiled:
        records.append({"kind": "skip", "what": "sort triton", "reason": reason})
    return records
