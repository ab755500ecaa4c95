"""What a person reads at the end of a run: the before/after table and file list (summary.md), the evaluation
summary, the comparison of two evaluations, and the figures that show what post-training changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import neco.config  # noqa: F401
from neco.engine.log import read_metrics
from neco.summary import compare_runs, eval_summary, train_summary
from neco.train import train
from neco.viz_neighbours import Query, class_ranking_auc, patch_labels, pick_queries, save_similarity_figure

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=quickstart", "backbone.weights=random", "logger.progress=false", "data.batch_size=2",
    "data.synthetic_images=8", "data.synthetic_size=48", "data.global_size=32", "data.local_size=16",
    "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16", "optim.epochs=1",
    "monitor.name=quick", "monitor.image_size=32", "monitor.train_images=8", "monitor.val_images=8",
    "monitor.num_figures=2",
]


def test_quick_run_ends_with_a_before_after_summary_and_a_similarity_figure(tmp_path, capsys):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=TINY + [f"paths.output_dir={tmp_path}"])
    run = tmp_path / "run"
    train(cfg, run)
    printed = capsys.readouterr().out
    summary = (run / "summary.md").read_text()
    assert summary in printed  # the same text on the console and in the file
    evals = {k: v for rec in read_metrics(run / "metrics.jsonl") for k, v in rec.items() if k.startswith("eval/")}
    before, after = evals["eval/before/heldout/neco_loss"], evals["eval/after/heldout/neco_loss"]
    row = next(line for line in summary.splitlines() if line.startswith("| NeCo loss on held-out crops"))
    assert row == (f"| NeCo loss on held-out crops (lower is better) | {before:.4f} | {after:.4f} | "
                   f"{after - before:+.4f} |")
    nn_row = next(line for line in summary.splitlines() if line.startswith("| NN retrieval mIoU (%)"))
    assert f"| {evals['eval/before/nn/miou']:.1f} |" in nn_row  # logged in %, shown as logged
    assert "similarity/ranking_auc" not in summary and "query-patch ranking AUC" in summary
    for name in ("crops.png", "loss.png", "segmentation_before.png", "segmentation_after.png", "similarity.png"):
        assert (run / "figures" / name).is_file()
        assert f"figures/{name}" in summary
    assert "checkpoints/ (last.pt" in summary and "checkpoint=" in summary


@pytest.mark.parametrize("variant", [["loss.references=queue", "loss.queue_length=64"], ["loss.mask=fg"]])
def test_held_out_loss_is_the_same_measure_for_the_same_networks_and_leaves_the_rng_alone(tmp_path, variant):
    from neco.before_after import BeforeAfterEvaluator
    from neco.engine.setup import build_student_teacher
    from neco.loss.neco import NeCoLoss

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=TINY + variant)
    student, teacher = build_student_teacher(cfg.backbone, cfg.loss)
    crops = [cfg.data.global_size] * 2 + [cfg.data.local_size] * 4
    objective = NeCoLoss(cfg.loss, student.backbone.patch_size, crops, 2, cfg.data.batch_size)
    queue = objective.queue.clone() if hasattr(objective, "queue") else None
    heldout = BeforeAfterEvaluator(cfg, tmp_path, torch.device("cpu"), None, student, teacher, objective).heldout
    torch.manual_seed(123)
    first = heldout(student, teacher, objective, torch.device("cpu"))
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = heldout(student, teacher, objective, torch.device("cpu"))
    assert torch.rand(1) == after_first  # the caller's random stream continues as if nothing had been drawn
    assert first == second and first > 0
    if queue is not None:
        assert torch.equal(objective.queue, queue)  # the reference queue of the training run is untouched
    student.train()
    assert heldout(student, teacher, objective, torch.device("cpu")) == first  # eval mode inside, whatever outside
    assert student.training  # and the caller's mode is restored
    with torch.no_grad():
        next(student.head.parameters()).add_(1.0)
    assert heldout(student, teacher, objective, torch.device("cpu")) != first  # it measures the networks


def test_ranking_auc_counts_ordered_pairs():
    labels = torch.tensor([[1, 1, 0], [0, 0, 0]])
    q = Query(0, 0, 0, 1)
    ordered = torch.tensor([[1.0, 0.9, 0.1], [0.2, 0.3, 0.0]])
    assert class_ranking_auc(ordered, labels, q) == 1.0
    assert class_ranking_auc(-ordered, labels, q) == 0.0 + 0.0  # the query itself is left out
    tied = torch.tensor([[1.0, 0.5, 0.5], [0.5, 0.5, 0.5]])
    assert class_ranking_auc(tied, labels, q) == 0.5


def test_queries_sit_in_the_largest_object_and_the_figure_is_written(tmp_path):
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 8:24, 8:24] = 3  # a big square of class 3
    masks[0, 0:8, 24:32] = 2  # a smaller object
    labels = patch_labels(masks, (4, 4))
    assert labels[0].tolist()[1] == [0, 3, 3, 0]
    queries = pick_queries(labels)
    assert len(queries) == 1  # image 1 has no object: no query
    assert (queries[0].image, queries[0].label) == (0, 3) and labels[0, queries[0].row, queries[0].col] == 3
    before, after = torch.rand(1, 4, 4), torch.rand(1, 4, 4)
    path, aucs = save_similarity_figure(torch.rand(2, 32, 32, 3).mul(255).byte().numpy(), labels, queries, before,
                                        after, tmp_path / "sim.png", 8, [f"c{i}" for i in range(4)])
    assert Path(path).stat().st_size > 10_000 and len(aucs) == 1
    assert aucs[0] == (class_ranking_auc(before[0], labels[0], queries[0]),
                       class_ranking_auc(after[0], labels[0], queries[0]))


def _results(run_dir: Path, miou: float, seconds: float = 3.0) -> list[dict]:
    records = [{"model": "vit_tiny", "weights": "starter.pt", "checkpoint": None, "data": "synthetic",
                "protocol": "overcluster", "metrics": {"k7/miou": miou, "k7/miou_std": 0.01}, "seconds": seconds},
               {"model": "vit_tiny", "weights": "starter.pt", "checkpoint": None, "data": "synthetic",
                "protocol": "linear", "metrics": {"miou": miou + 10.0}, "seconds": seconds}]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(records))
    return records


def test_eval_summary_lists_every_metric_and_where_the_results_are(tmp_path):
    records = _results(tmp_path / "ev", 8.0)  # the protocols store mIoU in % already
    (tmp_path / "ev" / "figures").mkdir()
    (tmp_path / "ev" / "figures" / "feature_pca.png").write_bytes(b"png")
    text = eval_summary(tmp_path / "ev", records, [tmp_path / "results.csv"], cwd=tmp_path)
    assert text == (tmp_path / "ev" / "summary.md").read_text()
    assert "| overcluster | k7/miou | 8.00 | 3.0 |" in text and "| linear | miou | 18.00 | 3.0 |" in text
    assert "| overcluster | k7/miou_std | 0.01 | 3.0 |" in text
    assert "results: ev/results.json" in text and "results.csv" in text
    assert "figure: ev/figures/feature_pca.png: the features' first three principal components" in text


def test_compare_writes_one_table_and_one_figure(tmp_path):
    _results(tmp_path / "starter", 8.0)
    _results(tmp_path / "after", 9.3)
    text = compare_runs([tmp_path / "starter", tmp_path / "after"], ["starter", "after NeCo"], tmp_path / "cmp")
    assert "| metric | starter | after NeCo | change |" in text
    assert "| overcluster/k7/miou | 8.00 | 9.30 | +1.30 |" in text
    assert (tmp_path / "cmp" / "comparison.md").read_text() == text
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


def test_compare_cli_names_a_missing_evaluation_in_one_line(tmp_path):
    _results(tmp_path / "starter", 8.0)
    proc = subprocess.run([sys.executable, "-m", "neco.summary", "compare", str(tmp_path / "starter"),
                           str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing' / 'results.json'}: no results.json (did the " \
                                  "evaluation finish?)"


@pytest.mark.parametrize("records", [[], [{"step": 4, "epoch": 1, "loss": 2.5}]])
def test_train_summary_without_evaluations_still_says_where_things_are(tmp_path, records):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    text = train_summary(tmp_path, cwd=tmp_path.parent)
    assert "Before and after" not in text
    assert f"run directory: {tmp_path.name}/" in text
    assert ("last logged loss 2.5000" in text) == bool(records)


def test_train_summary_shows_every_evaluations_percent_as_logged(tmp_path):
    # The quick check and the k-means monitor both log mIoU in %: the table shows the logged value, not x100.
    records = [{"step": 0, "eval/before/nn/miou": 18.11, "eval/before/kmeans/k7/miou": 8.21},
               {"step": 9, "eval/after/nn/miou": 18.38, "eval/after/kmeans/k7/miou": 9.0,
                "eval/after/heldout/neco_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = train_summary(tmp_path, cwd=tmp_path.parent).splitlines()
    assert "| NN retrieval mIoU (%) | 18.1 | 18.4 | +0.3 |" in lines
    assert "| kmeans/k7/miou | 8.2 | 9.0 | +0.8 |" in lines
    assert "| NeCo loss on held-out crops (lower is better) | - | 2.5000 | - |" in lines
