"""Worker for the concurrent-append test: imports only the results module, so spawning it is cheap."""

from neco.eval.results import append_to_table


def record(i: int = 0) -> dict:
    return {"model": "vit_tiny", "weights": None, "checkpoint": "/x/last.pt", "checkpoint_model": "student",
            "data": "synthetic", "protocol": "overcluster", "options": {"ks": [6, 50], "seeds": [0]},
            "metrics": {"k6/miou": 12.5 + i, "k50/miou": 40.0}, "run_dir": f"/runs/{i}"}


def append(args) -> None:
    root, i = args
    append_to_table(root, [record(i)])
