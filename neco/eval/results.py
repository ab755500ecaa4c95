"""Where evaluation results go: results.json in the run directory and one results table for all runs.

The table (``paths.results``/results.csv, rendered to results.md) gets one row per metric of every result,
appended under a file lock so that several SLURM jobs finishing at once never interleave or lose rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

TABLE_COLUMNS = [
    "date", "model", "weights", "checkpoint", "checkpoint_model", "data", "protocol", "metric", "value",
    "options", "run_dir",
]


def _plain(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, tuples lists, unknown objects their string."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _plain(obj.item())
    if hasattr(obj, "tolist"):
        return _plain(obj.tolist())
    return str(obj)


def write_results_json(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write ``records`` (one per protocol) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_plain(records), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table_rows(record: Mapping) -> Iterable[dict]:
    """Rows of the results table for one result record (see neco.eval.runner for its keys)."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    options = json.dumps(_plain(record.get("options", {})), sort_keys=True, separators=(",", ":"))
    for metric, value in record.get("metrics", {}).items():
        yield {
            "date": date, "model": record.get("model", ""), "weights": record.get("weights", ""),
            "checkpoint": record.get("checkpoint") or "", "checkpoint_model": record.get("checkpoint_model", ""),
            "data": record.get("data", ""), "protocol": record.get("protocol", ""), "metric": metric,
            "value": f"{value:.4f}" if isinstance(value, float) else value, "options": options,
            "run_dir": record.get("run_dir", ""),
        }


def append_to_table(results_dir: str | os.PathLike, records: Iterable[Mapping]) -> tuple[Path, Path]:
    """Append the rows of ``records`` to results.csv and re-render results.md; safe across processes."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = results_dir / "results.csv", results_dir / "results.md"
    rows = [row for record in records for row in table_rows(record)]
    with FileLock(str(results_dir / ".results.lock"), timeout=120):
        new = not csv_path.is_file() or csv_path.stat().st_size == 0
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        all_rows = read_table(csv_path)
        tmp = md_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(render_markdown(all_rows))
        os.replace(tmp, md_path)
    return csv_path, md_path


def read_table(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def render_markdown(rows: list[dict]) -> str:
    """The table without the long columns (options and run directory stay in the CSV)."""
    cols = ["date", "model", "checkpoint", "data", "protocol", "metric", "value"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|") for c in cols]
        if cells[2]:
            cells[2] = f"{Path(cells[2]).name} ({row.get('checkpoint_model', '')})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
