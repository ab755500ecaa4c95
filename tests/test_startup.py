"""Start-up behaviour a new user sees: loader processes capped at the CPUs, faiss's loader quiet, debug=fast
saying what will run."""

import logging
import subprocess
import sys
from pathlib import Path

from neco.data import workers

ROOT = Path(__file__).resolve().parents[1]


def test_num_workers_is_capped_at_the_available_cpus_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(workers, "_reported", set())
    with caplog.at_level(logging.INFO, logger="neco"):
        assert workers.cap_workers(8) == 2
        assert workers.cap_workers(8) == 2
        assert workers.cap_workers(1) == 1
    messages = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert messages == ["data.num_workers=8 capped at 2: the CPUs available to this process (set "
                        "data.num_workers to at most 2 to silence this)"]


def _faiss_loader_log(first: str) -> str:
    code = f"import logging; logging.basicConfig(level=logging.INFO); {first}; import faiss"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stderr


def test_faiss_loader_messages_are_silenced_by_importing_neco():
    assert "faiss.loader" in _faiss_loader_log("pass")  # without neco, the loader logs at INFO
    assert "faiss.loader" not in _faiss_loader_log("import neco")


def test_debug_fast_logs_the_steps_that_will_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neco.train", "debug=fast", "data=synthetic", "backbone=vit_tiny",
         "backbone.weights=random", "data.synthetic_images=16", "logger.progress=false", "optim.epochs=1",
         "loss.head.hidden_dim=32", "loss.head.out_dim=16", f"paths.output_dir={tmp_path}", "run_name=fast"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "4 steps/epoch x 1 epochs" in log
    assert "stops after max_steps=2 optimizer steps (8 images); the schedules still span the 4 steps" in log


def test_evaluating_a_checkpoint_logs_only_the_weights_it_loads(tmp_path, caplog):
    import torch
    from hydra import compose, initialize_config_dir

    import neco.eval.config  # noqa: F401
    from neco.eval.runner import load_model
    from neco.models.backbone import build_backbone

    source = build_backbone("vit_tiny", weights="random")
    torch.save({"student": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "last.pt")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["experiment=quickstart", "data=synthetic", "eval=quick",
                                             f"checkpoint={tmp_path / 'last.pt'}"])
    caplog.clear()  # only what load_model logs (the source above logs its own random initialisation)
    with caplog.at_level(logging.INFO, logger="neco"):
        model, _ = load_model(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("random initialisation" in m for m in messages), messages
    assert any(f"from {tmp_path / 'last.pt'}" in m for m in messages), messages
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
