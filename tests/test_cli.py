"""`python -m neco.train` as a user runs it: clear one-line errors, the printed recipe, sweeps."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=quickstart", "backbone.weights=random", "monitor.name=none", "logger.progress=false",
        "data.batch_size=2", "data.synthetic_images=4", "data.synthetic_size=48", "data.global_size=32",
        "data.local_size=16", "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16"]


def run_train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "neco.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["loss.studnet_steepness=1"], "unknown setting loss.studnet_steepness (did you mean loss.student_steepness?)"),
    (["optim.epochs=abc"], "optim.epochs"),
    (["backbone=vit_huge"], "backbone=vit_huge: no such backbone option"),
    (["paths.coco=/no/such/coco"], "paths.coco=/no/such/coco"),
    (["data=synthetic", "backbone=vit_tiny", "backbone.weights=/no/such/file.pt"], "backbone.weights=/no/such/file.pt"),
    (["data=synthetic", "paths.weights=/no/such/cache"], "backbone.weights=random"),  # official weights, offline
    (["experiment=small/neco_leopart", "data=synthetic"], "backbone.weights must be set"),
    (["data=synthetic", "backbone=vit_tiny", "backbone.weights=random", "loss.network=merge"], "loss.network"),
])
def test_user_errors_are_one_clear_message(tmp_path, args, needle):
    proc = run_train(*args, f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cfg_job_prints_the_published_recipe(tmp_path):
    proc = run_train("backbone=dinov2_vits14", "data=coco", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for line in ("global_size: 518", "local_size: 98", "batch_size: 64", "epochs: 25", "references: queue",
                 "lr_backbone: 1.0e-05", "name: dinov2_vits14"):
        assert line in proc.stdout


def test_sweep_makes_one_run_directory_per_job(tmp_path):
    proc = run_train("-m", *TINY, "max_steps=1", "loss.student_steepness=10,100", f"paths.output_dir={tmp_path}",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in (tmp_path / "multirun" / "quickstart").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for run, steepness in zip(runs, ("10.0", "100.0")):
        assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "last.pt").is_file()
        assert f"student_steepness: {steepness}" in (run / "config.yaml").read_text()
