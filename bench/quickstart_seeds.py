"""Run the quickstart for several seeds and report its before/after metrics as mean +- std.

    python bench/quickstart_seeds.py                 # seeds 0 1 2, runs under outputs/runs/quickstart-seed<N>
    python bench/quickstart_seeds.py --seeds 0 1 2 --extra optim.epochs=2

Each seed is a separate `python -m neco.train experiment=quickstart seed=<N>` process; the wall time of each is
printed with the table, so the README's numbers come with their command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("nn/miou", "kmeans/miou", "nn/pixel_acc", "kmeans/pixel_acc")


def run_seed(seed: int, output_dir: str, extra: list[str]) -> tuple[dict, float]:
    run_name = f"quickstart-seed{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neco.train", "experiment=quickstart", f"seed={seed}",
                    f"run_name={run_name}", "resume=null", f"paths.output_dir={output_dir}", *extra], check=True)
    wall = time.perf_counter() - start
    metrics = {}
    with (Path(output_dir) / "runs" / run_name / "metrics.jsonl").open() as f:
        for line in f:
            metrics.update({k: v for k, v in json.loads(line).items() if k.startswith("eval/")})
    return metrics, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()
    results, walls = [], []
    for seed in args.seeds:
        metrics, wall = run_seed(seed, args.output_dir, args.extra)
        results.append(metrics)
        walls.append(wall)
    print(f"\n{len(args.seeds)} seeds {args.seeds}; wall time per run (s): {', '.join(f'{w:.0f}' for w in walls)}")
    print("| metric | before | after | change |")
    print("|---|---|---|---|")
    for key in KEYS:
        before = [r[f"eval/before/{key}"] for r in results]
        after = [r[f"eval/after/{key}"] for r in results]
        delta = [a - b for a, b in zip(after, before)]
        print(f"| {key} | {_fmt(before)} | {_fmt(after)} | {_fmt(delta, sign=True)} |")


def _fmt(values: list[float], sign: bool = False) -> str:  # the quick check logs mIoU and accuracy in %
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if sign else f"{mean:.1f} ± {std:.1f}"


if __name__ == "__main__":
    main()
