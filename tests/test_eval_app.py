"""`python -m neco.eval`: option precedence, checkpoint loading, results files and user errors."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from neco.errors import ConfigError
from neco.eval.context import EXPLICIT_KEY, typed_options
from neco.eval.runner import explicit_options

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Opts:
    image_size: int = 448
    epochs: int = 25


def test_per_dataset_block_and_explicit_overrides():
    cfg = {"image_size": 448, "epochs": 25, "per_dataset": {"synthetic": {"image_size": 96, "epochs": 4}}}
    assert typed_options(_Opts, cfg, "voc") == _Opts(448, 25)
    assert typed_options(_Opts, cfg, "synthetic") == _Opts(96, 4)
    # A value set on the command line wins over the dataset's block.
    cfg_cli = dict(cfg, epochs=2, **{EXPLICIT_KEY: ["epochs"]})
    assert typed_options(_Opts, cfg_cli, "synthetic") == _Opts(96, 2)
    with pytest.raises(ConfigError, match="eval.linear.epoch"):
        typed_options(_Opts, {"epoch": 3}, "voc", "linear")


def test_explicit_options_from_overrides():
    overrides = ["data=voc", "eval.linear.epochs=2", "+eval.linear.per_dataset.voc.lr=1", "eval.overcluster.ks=[5]"]
    assert explicit_options(overrides, "linear") == ["epochs"]
    assert explicit_options(overrides, "overcluster") == ["ks"]


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", NECO_OUTPUT=str(tmp_path / "out"))
    return subprocess.run([sys.executable, "-m", "neco.eval", *args, "logger.progress=false"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_protocol_on_a_training_checkpoint(tmp_path):
    """A checkpoint of this project (student and teacher inside) evaluates end to end; results are written."""
    from neco.config import asset_path

    starter = torch.load(asset_path("vit_tiny_synthetic.pt"), map_location="cpu", weights_only=True)
    state = {f"backbone.{k}": v for k, v in starter.items()}
    ckpt = tmp_path / "last.pt"
    # The teacher is deliberately different: the default (student) must be the one evaluated.
    teacher = {k: torch.zeros_like(v) if k.endswith("pos_embed") else v for k, v in state.items()}
    torch.save({"student": state, "teacher": teacher, "step": 3}, ckpt)
    args = ["experiment=quickstart", "eval=quick", f"checkpoint={ckpt}", "eval.quick.train_images=32",
            "eval.quick.val_images=16", "eval.quick.image_size=64", "num_workers=0", "num_figures=2"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "out" / "eval" / "quickstart").iterdir())
    assert len(run_dirs) == 1
    records = json.loads((run_dirs[0] / "results.json").read_text())
    assert records[0]["protocol"] == "quick" and records[0]["checkpoint_model"] == "student"
    assert records[0]["options"]["val_images"] == 16
    assert 0.0 <= records[0]["metrics"]["nn/miou"] <= 100.0
    assert (run_dirs[0] / "figures" / "feature_pca.png").is_file()
    assert (run_dirs[0] / "quick" / "segmentation.png").is_file()
    table = (tmp_path / "out" / "results" / "results.csv").read_text()
    assert "quick,nn/miou" in table
    # The teacher is a different network: its numbers differ.
    proc_t = _run(args + ["checkpoint_model=teacher", "append_table=false"], tmp_path)
    assert proc_t.returncode == 0, proc_t.stderr[-3000:]
    newest = max((tmp_path / "out" / "eval" / "quickstart").iterdir(), key=lambda p: p.stat().st_mtime)
    teacher_rec = json.loads((newest / "results.json").read_text())[0]
    assert teacher_rec["checkpoint_model"] == "teacher"
    assert teacher_rec["metrics"] != records[0]["metrics"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=synthetic", "backbone=vit_tiny", "backbone.weights=random", "eval=hummingbrd"], "eval=hummingbrd:"),
        (["data=synthetic", "backbone=vit_tiny", "checkpoint=/no/such/last.pt"], "checkpoint=/no/such/last.pt"),
        (["data=voc", "backbone=vit_tiny", "backbone.weights=random", "paths.voc=/no/voc"], "paths.voc"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    proc = _run(args, tmp_path, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
