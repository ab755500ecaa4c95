"""Cost of the Hummingbird exact search at Pascal VOC's full size (METHOD.md §6.3).

Default sizes: 10,240,000 memory patches (1024 x 10^4) of dimension 384 (ViT-S), searched by the 1,449 val images
x 36 x 36 patches (504 px, patch 14), k = 30. Without ``--full`` a slice is searched (random unit vectors) and the
time is extrapolated linearly in memory rows and queries, and printed as an extrapolation. ``--full`` searches
the whole problem for real (float16 memory: 7.9 GB), meant for a GPU.

    OMP_NUM_THREADS=2 python bench/hummingbird_cost.py --slice-memory 1024000 --slice-queries 2048
    python bench/hummingbird_cost.py --device cuda --full
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from neco.eval.primitives.knn import make_index, resolve_search, search_blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: the clock must see the finished kernels


def time_retrieval(
    num_memory: int,
    num_queries: int,
    dim: int = 384,
    k: int = 30,
    device: str | torch.device = "cpu",
    search: str = "torch",
    memory_dtype: str = "float16",
    slice_memory: int | None = None,
    slice_queries: int | None = None,
    query_block: int = 4096,
    seed: int = 0,
) -> dict:
    """Time the exact search of ``num_queries`` against ``num_memory`` rows of dimension ``dim``.

    With ``slice_memory`` / ``slice_queries`` smaller than the full sizes, only that slice is searched (random unit
    vectors) and the time is extrapolated linearly in both (the search cost is ``Q x M x D``); ``extrapolated`` in
    the result says so. Returns the measured seconds, the slice, and the estimated full time.
    """
    device = torch.device(device)
    search = resolve_search(search, device)
    m = min(slice_memory or num_memory, num_memory)
    q = min(slice_queries or num_queries, num_queries)
    g = torch.Generator(device).manual_seed(seed)  # random data made where it is searched: no transfer
    index = make_index(search, m, dim, device, memory_dtype)
    block = 1 << 18
    for s in range(0, m, block):  # filled block by block, as the real memory is
        x = torch.randn(min(block, m - s), dim, generator=g, device=device)
        index.add(torch.nn.functional.normalize(x, dim=1))
    queries = torch.nn.functional.normalize(torch.randn(q, dim, generator=g, device=device), dim=1)
    search_blocks(index, queries[: min(q, 64)], k, query_block)  # warm-up (kernels, thread pools)
    _sync(device)
    start = time.perf_counter()
    search_blocks(index, queries, k, query_block)
    _sync(device)
    seconds = time.perf_counter() - start
    factor = (num_memory / m) * (num_queries / q)
    return {
        "search": search, "device": str(device), "dim": dim, "k": k,
        # faiss on a CPU always stores float32
        "memory_dtype": "float32" if search == "faiss" and device.type != "cuda" else memory_dtype,
        "slice_memory": m, "slice_queries": q, "slice_seconds": seconds,
        "num_memory": num_memory, "num_queries": num_queries,
        "extrapolated": not math.isclose(factor, 1.0), "estimated_seconds": seconds * factor,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", type=int, default=10_240_000)
    ap.add_argument("--queries", type=int, default=1449 * 36 * 36)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--search", default="torch", choices=["auto", "torch", "faiss"])
    ap.add_argument("--memory-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--slice-memory", type=int, default=1_024_000)
    ap.add_argument("--slice-queries", type=int, default=2048)
    ap.add_argument("--query-block", type=int, default=4096)
    ap.add_argument("--full", action="store_true", help="search the whole problem (no extrapolation)")
    args = ap.parse_args(argv)
    res = time_retrieval(
        args.memory, args.queries, args.dim, args.k, args.device, args.search, args.memory_dtype,
        slice_memory=None if args.full else args.slice_memory,
        slice_queries=None if args.full else args.slice_queries,
        query_block=args.query_block,
    )
    if torch.cuda.is_available() and torch.device(args.device).type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    res["threads"] = torch.get_num_threads()
    how = "EXTRAPOLATED linearly from the measured slice" if res["extrapolated"] else "measured"
    print(f"searched {res['slice_queries']:,} queries x {res['slice_memory']:,} memory rows x {res['dim']} dims "
          f"({res['search']}, {res['memory_dtype']}, {res['device']}, {res['threads']} threads) in "
          f"{res['slice_seconds']:.2f} s")
    print(f"full size {res['num_queries']:,} x {res['num_memory']:,}: {res['estimated_seconds']:.1f} s "
          f"= {res['estimated_seconds'] / 3600:.2f} h ({how})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
