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

import torch

from neco.eval.hummingbird.search import time_retrieval


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
