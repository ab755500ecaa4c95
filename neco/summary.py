"""The few lines that end every run: what changed, and where the run's files are (also ``<run_dir>/summary.md``).

``python -m neco.summary compare A B --labels starter "after NeCo" --out DIR`` compares two evaluation runs
(their ``results.json``): one table (``comparison.md``) and one figure (``comparison.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# What each figure a run may write shows, for the summary's list of files.
FIGURES = {
    "crops.png": "one image's global and local crops, with the regions each pair aligns",
    "segmentation_before.png": "validation images: truth, NN-retrieval and k-means predictions before training",
    "segmentation_after.png": "the same after training",
    "similarity.png": "query-patch similarity maps before and after, and their difference",
    "loss.png": "the training loss (raw and smoothed)",
    "feature_pca.png": "the features' first three principal components as RGB",
    "comparison.png": "each metric, side by side for the evaluated models",
}
# Readable names of the quick check's metrics (the quickstart's before/after table).
NAMES = {
    "nn/miou": "NN retrieval mIoU (%)",
    "kmeans/miou": "k-means mIoU (%)",
    "nn/pixel_acc": "NN retrieval pixel accuracy (%)",
    "kmeans/pixel_acc": "k-means pixel accuracy (%)",
    "heldout/neco_loss": "NeCo loss on held-out crops (lower is better)",
    "similarity/ranking_auc": "query-patch ranking AUC, same class above others (higher is better)",
}


def fraction_in_percent(metric: str) -> bool:
    """The quick check (training-time ``monitor=quick``) stores mIoU and accuracies as fractions: shown in %.

    The evaluation protocols (``python -m neco.eval``) store them in % already, and are shown as stored."""
    last = metric.rsplit("/", 1)[-1]
    return last in ("miou", "pixel_acc")


def _as_stored(metric: str) -> bool:
    return False


def _fmt(metric: str, value, percent=fraction_in_percent) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    if percent(metric):
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if percent is _as_stored else f"{value:.4f}"


def _change(metric: str, before, after, percent=fraction_in_percent) -> str:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)):
        return "-"
    d = after - before
    if percent(metric):
        return f"{100 * d:+.1f}"
    return f"{d:+.2f}" if percent is _as_stored else f"{d:+.4f}"


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a killed run's last line may be cut short
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _files(run_dir: Path, cwd: Path | None = None) -> list[str]:
    """Lines naming the run's checkpoints and figures that exist, with what each figure shows."""
    lines = []
    ckpts = sorted((run_dir / "checkpoints").glob("*.pt"))
    if ckpts:
        lines.append(f"- checkpoints: {_rel(run_dir / 'checkpoints', cwd)}/ ({', '.join(p.name for p in ckpts)})")
    for fig in sorted(run_dir.rglob("*.png")):
        what = FIGURES.get(fig.name, "")
        lines.append(f"- figure: {_rel(fig, cwd)}" + (f": {what}" if what else ""))
    return lines


def _rel(path: Path, cwd: Path | None) -> str:
    cwd = Path.cwd() if cwd is None else cwd
    try:
        return str(Path(path).resolve().relative_to(cwd.resolve()))
    except ValueError:
        return str(path)


def eval_tables(records: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """``{tag: {metric: value}}`` from a run's metrics.jsonl (``eval/<tag>/<metric>``; per-class values left out)."""
    tables: dict[str, dict[str, float]] = {}
    for rec in records:
        for key, value in rec.items():
            if key.startswith("eval/") and "/class/" not in key and isinstance(value, (int, float)):
                _, tag, metric = key.split("/", 2)
                tables.setdefault(tag, {})[metric] = float(value)
    return tables


def comparison_table(columns: Mapping[str, Mapping[str, float]], names: Mapping[str, str] = NAMES,
                     percent=fraction_in_percent) -> list[str]:
    """Markdown rows: one per metric, one column per model / state, and the change from the first to the last."""
    labels = list(columns)
    metrics = list(dict.fromkeys(m for c in columns.values() for m in c))
    # The named metrics in their order, then the mIoUs, then the rest (a stable sort keeps each protocol's order).
    metrics.sort(key=lambda m: list(names).index(m) if m in names else len(names) + (not m.endswith("miou")))
    head = ["metric", *labels] + (["change"] if len(labels) > 1 else [])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in metrics:
        values = [columns[label].get(m) for label in labels]
        cells = [names.get(m, m), *(_fmt(m, v, percent) for v in values)]
        if len(labels) > 1:
            cells.append(_change(m, values[0], values[-1], percent))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def train_summary(run_dir: str | Path, cwd: Path | None = None) -> str:
    """The end-of-run summary of a training run; written to ``<run_dir>/summary.md`` and returned."""
    run_dir = Path(run_dir)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "step" in r]
    info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    total = info.get("derived", {}).get("total_steps")
    lines = [f"# Training run {run_dir.name}", ""]
    if steps:
        last = steps[-1]
        of = f" of {total}" if total else ""
        lines.append(f"{last['step']}{of} optimizer steps; last logged loss {last['loss']:.4f}.")
    tables = eval_tables(records)
    before, after = tables.pop("before", None), tables.pop("after", None)
    columns = {label: t for label, t in (("before", before), ("after", after)) if t}
    if columns:
        lines += ["", "## Before and after" if len(columns) == 2 else "## Evaluation", ""]
        lines += comparison_table(columns)
        if "heldout/neco_loss" in (after or {}):
            lines += ["", "NeCo trains each patch to order its neighbours as the teacher does: the held-out loss "
                      "measures exactly that on images the run never saw; the ranking AUC, how often a patch of "
                      "the query's own object is ranked above a patch of another (figures/similarity.png)."]
    for tag, metrics in tables.items():  # periodic evaluations (epoch<N>, step<N>): the last one
        lines.append(f"\nlast periodic evaluation ({tag}): " + ", ".join(f"{k} {_fmt(k, v)}" for k, v in
                                                                           list(metrics.items())[:6]))
    lines += ["", "## Where everything is", "", f"- run directory: {_rel(run_dir, cwd)}/",
              "- metrics: metrics.jsonl (one JSON object per logged step and evaluation)",
              "- configuration: config.yaml (resolved), run_info.json (versions, device, derived sizes)"]
    lines += _files(run_dir, cwd)
    lines.append(f"- this summary: {_rel(run_dir / 'summary.md', cwd)}")
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        lines += ["", "## Next", "", "Evaluate the checkpoint with the published protocols, e.g.:", "",
                  f"    python -m neco.eval <same experiment/backbone> checkpoint={_rel(ckpt, cwd)}"]
    text = "\n".join(lines) + "\n"
    (run_dir / "summary.md").write_text(text)
    return text


def results_columns(records: Sequence[Mapping]) -> dict[str, float]:
    """``{"<protocol> <metric>": value}`` of an evaluation's records (scalars only)."""
    out = {}
    for rec in records:
        for metric, value in rec.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{rec['protocol']}/{metric}"] = float(value)
    return out


def eval_summary(run_dir: str | Path, records: Sequence[Mapping], tables: Sequence[Path] = (),
                 cwd: Path | None = None) -> str:
    """The end-of-run summary of an evaluation; written to ``<run_dir>/summary.md`` and returned."""
    run_dir = Path(run_dir)
    first = records[0] if records else {}
    weights = first.get("checkpoint") or first.get("weights") or "?"
    lines = [f"# Evaluation of {first.get('model', '?')} ({weights}) on {first.get('data', '?')}", ""]
    lines += ["| protocol | metric | value | time (s) |", "|---|---|---|---|"]
    for rec in records:
        for metric, value in rec.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"| {rec['protocol']} | {metric} | {_fmt(metric, value, _as_stored)} | "
                             f"{rec.get('seconds', '-')} |")
    lines += ["", "mIoU and accuracies in %. All values: results.json.", "", "## Where everything is", "",
              f"- run directory: {_rel(run_dir, cwd)}/",
              f"- results: {_rel(run_dir / 'results.json', cwd)} (options, per-class and per-seed values, versions)"]
    lines += [f"- results table (every evaluation so far): {_rel(Path(t), cwd)}" for t in tables]
    lines += _files(run_dir, cwd)
    lines.append(f"- this summary: {_rel(run_dir / 'summary.md', cwd)}")
    text = "\n".join(lines) + "\n"
    (run_dir / "summary.md").write_text(text)
    return text


def compare_runs(run_dirs: Sequence[str | Path], labels: Sequence[str], out_dir: str | Path) -> str:
    """One table (``comparison.md``) and one figure (``comparison.png``) of several evaluation runs."""
    from neco.viz import save_comparison_figure

    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} runs but {len(labels)} labels")
    columns = {}
    for label, d in zip(labels, run_dirs):
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results.json (did the evaluation finish?)")
        data = json.loads(path.read_text())
        records = data if isinstance(data, list) else data.get("records", [data])
        columns[label] = results_columns(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = save_comparison_figure(columns, out_dir / "comparison.png")
    lines = [f"# {' vs '.join(labels)}", ""] + comparison_table(columns, names={}, percent=_as_stored) + [
        "", "mIoU and accuracies in %; change = last column minus first.", ""]
    lines += [f"- {label}: {_rel(Path(d), None)}/results.json" for label, d in zip(labels, run_dirs)]
    lines.append(f"- figure: {_rel(figure, None)}")
    text = "\n".join(lines) + "\n"
    (out_dir / "comparison.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neco.summary", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="compare evaluation runs: comparison.md and comparison.png")
    cmp.add_argument("runs", nargs="+", help="evaluation run directories (each with results.json)")
    cmp.add_argument("--labels", nargs="+", help="one name per run (default: the directory names)")
    cmp.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    try:
        print(compare_runs(args.runs, labels, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
