"""End-to-end training on vit_tiny and synthetic scenes: loss variants, resume, run directory contents."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import neco.config  # noqa: F401
from neco.engine.log import read_metrics
from neco.engine.setup import build_student_teacher
from neco.engine.trainer import Trainer
from neco.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "experiment=quickstart", "backbone.weights=random", "monitor.name=none", "logger.progress=false",
    "data.batch_size=2", "data.synthetic_images=8", "data.synthetic_size=48", "data.global_size=32",
    "data.local_size=16", "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16",
    "logger.log_every=1", "optim.epochs=2",
]


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=TINY + [f"paths.output_dir={tmp_path}", *overrides])
    return cfg


QUEUE = ("loss.references=queue", "loss.queue_length=64")
# (overrides, the run they are compared with, what they must change in two steps): "loss" the first step's
# loss (same weights, same batch), "teacher" the teacher at the second step, "student" the student after it.
# The quickstart preset already sets loss.references=batch and loss.teacher_head_init=copy.
VARIANTS = [
    ((), None, None),
    (QUEUE, (), "loss"),
    ((*QUEUE, "loss.queue_counter=per_queue"), QUEUE, "loss"),
    (("loss.network=odd_even",), (), "loss"),
    (("loss.similarity=euclidean",), (), "loss"),
    (("loss.distribution=logistic",), (), "loss"),
    (("loss.distribution=gaussian",), (), "loss"),
    (("loss.student_steepness=10", "loss.teacher_steepness=1000"), (), "loss"),
    (("loss.mask=fg",), (), "loss"),
    (("loss.mask=bg",), (), "loss"),
    (("loss.use_teacher=false",), (), "loss"),
    (("loss.reference_source=student",), (), "loss"),
    (("loss.teacher_head_init=independent",), (), "loss"),
    # grid and patch scaling differ only for crops that are not a whole number of patches (20 px at patch 8)
    (("loss.box_scale=grid", "data.local_size=20"), ("data.local_size=20",), "loss"),
    (("loss.mask=fg", "loss.mask_blur_padding=zeros", "loss.fg_cell_rule=tolerant",
      "backbone.drop_path_mode=per_sample", "optim.zero_loss_step=hold"), ("loss.mask=fg",), "loss"),
    (("optim.ema_timing=after_step",), (), "teacher"),
    (("optim.decay_tokens=false", "optim.grad_clip=1.0"), (), "student"),
    (("optim.trainable_blocks=-1",), (), "student"),
    (("optim.accumulate=2",), (), "loss"),
]


def _two_steps(tmp_path, monkeypatch, overrides):
    """Train two steps; the gradients of the last step and what the run changed: the first step's loss, the
    teacher's weights at the second optimizer step, the student's weights after the run (as sums)."""
    cfg = tiny_cfg(tmp_path, "max_steps=2", *overrides)
    grads, teacher_sums, trainer = {}, [], []
    original = Trainer._optimizer_step

    def capture(self):  # the gradients the optimizer is about to use
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                grads[name] = p.grad
        teacher_sums.append(sum(float(p.detach().double().sum()) for p in self.teacher.parameters()))
        trainer[:] = [self]
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", capture)
    result = train(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    student = sum(float(p.detach().double().sum()) for p in trainer[0].student.parameters())
    return result, grads, {"loss": losses[0], "teacher": teacher_sums[1], "student": student}


_TRACES: dict = {}


def _trace(tmp_path, overrides):
    if overrides not in _TRACES:
        with pytest.MonkeyPatch.context() as m:
            _TRACES[overrides] = _two_steps(tmp_path / "baseline", m, list(overrides))[2]
    return _TRACES[overrides]


@pytest.mark.parametrize("overrides,baseline,claim", VARIANTS, ids=[",".join(o) or "default" for o, _, _ in VARIANTS])
def test_two_steps_of_every_variant(tmp_path, overrides, baseline, claim, monkeypatch):
    result, grads, trace = _two_steps(tmp_path, monkeypatch, list(overrides))
    if baseline is None:  # the same run twice is the same to the last bit, so a comparison below can fail
        assert _trace(tmp_path, overrides) == trace
    else:  # an option the code ignored would pass every check below as long as the run stays finite
        assert trace[claim] != _trace(tmp_path, baseline)[claim], f"{overrides} did not change the {claim}"
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    # Tokens that never reach the loss (the unused mask token) are not among timm's parameters here; every
    # trainable parameter must actually move the loss.
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_trainable_blocks_freeze_the_rest(tmp_path):
    cfg = tiny_cfg(tmp_path)
    student, _ = build_student_teacher(cfg.backbone, cfg.loss)
    from neco.engine.optim import select_trainable_blocks

    select_trainable_blocks(student.backbone, -1)
    trainable = {n for n, p in student.backbone.named_parameters() if p.requires_grad}
    last = max(int(n.split(".")[1]) for n in trainable)
    assert trainable and all(n.startswith(f"blocks.{last}.") for n in trainable)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    full = tiny_cfg(tmp_path, "run_name=full", "checkpoint_every=1")
    train(full, tmp_path / "full")
    losses_full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]

    part = tiny_cfg(tmp_path, "run_name=part", "max_steps=3", "checkpoint_every=1")
    train(part, tmp_path / "part")
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert "last.pt" in ckpts and "step_3.pt" in ckpts
    resumed = tiny_cfg(tmp_path, "run_name=part", "resume=auto", "checkpoint_every=1")
    train(resumed, tmp_path / "part")
    losses_resumed = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert len(losses_full) == 8  # 8 images / batch 2 = 4 steps per epoch, x 2 epochs, logged every step
    assert losses_resumed == losses_full  # bitwise: num_workers=0 on the CPU

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def test_queue_is_restored_on_resume(tmp_path):
    cfg = tiny_cfg(tmp_path, "loss.references=queue", "loss.queue_length=200", "max_steps=2")
    train(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    # 2 steps x 2 teacher crops x 10 rows per image x batch 2, on the reference's shared counter
    assert state["objective"]["queue_entries"].tolist() == [80, 80]
    assert state["objective"]["queue"].abs().sum() > 0


def test_run_directory_is_self_describing(tmp_path):
    cfg = tiny_cfg(tmp_path, "max_steps=2", "keep_checkpoints=1", "checkpoint_every=1")
    train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert {"git_sha", "torch", "device", "seed", "derived"} <= set(info)
    assert info["derived"]["effective_batch"] == 2 and info["derived"]["steps_per_epoch"] == 4
    assert "loss:" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_2.pt"]
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert {"step", "epoch", "loss", "lr_backbone", "lr_head", "wd", "momentum", "images_per_s"} <= set(record)
    assert (run / "figures" / "crops.png").is_file() and (run / "figures" / "loss.png").is_file()


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, monkeypatch):
    from neco.engine.trainer import TrainingDiverged

    cfg = tiny_cfg(tmp_path, "max_steps=2", "checkpoint_every=1")
    train(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setattr(Trainer, "compute_loss", lambda self, crops, boxes: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="last checkpoint"):
        train(tiny_cfg(tmp_path, "max_steps=4", "checkpoint_every=1"), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
