"""Checkpoint layouts of other projects and of this one, and `python -m neco.export`.

No sample file of the NeCo, Leopart, TimeT or DINO releases is available offline, so their layouts are built
here from each project's published loading code and module names: NeCo's LightningModule keeps the student as
``model`` (with its ``projection_head``) and the EMA teacher as ``teacher``, and its README loads the released
files into torch.hub DINOv2 with ``strict=False``; Leopart's README strips one key component (``model.``), TimeT's
two (``feature_extractor.model.``); DINO full checkpoints hold ``teacher``/``student`` with ``backbone.``/``head.``.
Exports are loaded strictly by code that is not ours: plain timm, the ``dinov2`` package, safetensors.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import randomize_
from safetensors.torch import load_file

from neco.engine.checkpoint import rng_state, save_checkpoint
from neco.errors import ConfigError
from neco.export import export_backbone
from neco.models import BACKBONES, ProjectionHead, WeightsError, build_backbone
from neco.models.backbone import create_vit
from neco.models.encoder import DenseEncoder

try:
    from dinov2.models.vision_transformer import DinoVisionTransformer
except ImportError:  # optional dev dependency: `pip install --no-deps dinov2==0.0.1.dev2`
    DinoVisionTransformer = None

needs_dinov2 = pytest.mark.skipif(DinoVisionTransformer is None, reason="dinov2==0.0.1.dev2 not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shallow(monkeypatch, name, depth=2):
    spec = BACKBONES[name]
    monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": depth}))


def dinov2_small(seed, depth=2, **kwargs):
    """The ``dinov2`` package's ViT-S/14 (hub key layout), random weights."""
    kwargs = {"img_size": 518, "patch_size": 14, "embed_dim": 384, "depth": depth, "num_heads": 6,
              "init_values": 1.0, "block_chunks": 0, **kwargs}
    return randomize_(DinoVisionTransformer(**kwargs), seed=seed).eval()


def tokens_of(model, x):
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return model.forward_features(x)["x_norm_patchtokens"].reshape(x.shape[0], h, w, -1)


def assert_loaded(backbone, sd):
    own = backbone.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def prefixed(sd, prefix):
    return {f"{prefix}{k}": v for k, v in sd.items()}


HEAD = {"projection_head.0.weight": torch.zeros(16, 384), "projection_head.0.bias": torch.zeros(16)}


# ------------------------------------------------------------------------------------------------ NeCo


@needs_dinov2
def test_neco_released_file_with_extra_head_keys(tmp_path, monkeypatch, caplog):
    shallow(monkeypatch, "dinov2_vits14")
    theirs = dinov2_small(seed=1)
    path = save({**theirs.state_dict(), **HEAD}, tmp_path / "neco_on_dinov2_vit14_model.ckpt")
    with caplog.at_level(logging.INFO):
        b = build_backbone("dinov2_vits14", weights=path).eval()
    assert "projection_head.* (2)" in caplog.text
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        torch.testing.assert_close(b(x), tokens_of(theirs, x), rtol=1e-5, atol=1e-5)


@needs_dinov2
@pytest.mark.parametrize("choice", ["auto", "student", "teacher"])
def test_neco_lightning_checkpoint(choice, tmp_path, monkeypatch):
    shallow(monkeypatch, "dinov2_vits14")
    student, teacher = dinov2_small(seed=1), dinov2_small(seed=2)
    ckpt = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.9.0",
        "state_dict": {**prefixed({**student.state_dict(), **HEAD}, "model."),
                       **prefixed({**teacher.state_dict(), **HEAD}, "teacher.")},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-5}]}],
        "hyper_parameters": {"arch": "vit-small", "arch_version": "v2", "patch_size": 14},
    }
    b = build_backbone("dinov2_vits14", weights=save(ckpt, tmp_path / "neco.ckpt"), checkpoint_model=choice)
    expected = teacher if choice == "teacher" else student  # auto: the student, as the reference loads
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), tokens_of(expected, x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DINO v1 layouts


@pytest.fixture
def dino_sd(monkeypatch):
    """A DINO ViT-S/16 (two blocks) state dict: DINO's keys are timm's."""
    shallow(monkeypatch, "dino_vits16")
    return randomize_(create_vit(BACKBONES["dino_vits16"]), seed=7).state_dict()


LAYOUTS = {
    "leopart": lambda sd: {**prefixed({**sd, **HEAD}, "model."), "prototypes.weight": torch.zeros(300, 256)},
    "leopart_lightning": lambda sd: {"state_dict": {**prefixed({**sd, **HEAD}, "model."),
                                                    "prototypes.weight": torch.zeros(300, 256)}, "epoch": 50},
    "timet": lambda sd: {**prefixed(sd, "feature_extractor.model."), "prototypes": torch.zeros(200, 256),
                         "feature_extractor.mlp_head.0.weight": torch.zeros(16, 384)},
    "timet_ddp": lambda sd: {**prefixed(sd, "module.feature_extractor.model."),
                             "module.prototypes": torch.zeros(200, 256)},
    "timet_model": lambda sd: prefixed({**sd, "head.weight": torch.zeros(16, 384)}, "module.model."),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_leopart_and_timet_layouts(layout, dino_sd, tmp_path, caplog):
    path = save(LAYOUTS[layout](dino_sd), tmp_path / f"{layout}.ckpt")
    with caplog.at_level(logging.INFO):
        assert_loaded(build_backbone("dino_vits16", weights=path), dino_sd)
    assert "not loaded" in caplog.text  # heads and prototypes are reported


def test_dino_full_checkpoint_teacher_by_default(dino_sd, tmp_path):
    import argparse

    full = {
        "teacher": {**prefixed(dino_sd, "backbone."), "head.mlp.0.weight": torch.zeros(2048, 384),
                    "head.last_layer.weight_g": torch.ones(1, 1)},
        "student": prefixed({k: v + 1 for k, v in dino_sd.items()}, "module.backbone."),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }
    path = save(full, tmp_path / "dino_full.pth")
    assert_loaded(build_backbone("dino_vits16", weights=path), dino_sd)
    student = build_backbone("dino_vits16", weights=path, checkpoint_model="student")
    torch.testing.assert_close(student.cls_token, dino_sd["cls_token"] + 1)


def test_checkpoint_model_errors(dino_sd, tmp_path):
    path = save(LAYOUTS["leopart"](dino_sd), tmp_path / "leopart.ckpt")
    with pytest.raises(WeightsError, match="holds only the student network 'model.'"):
        build_backbone("dino_vits16", weights=path, checkpoint_model="teacher")
    with pytest.raises(WeightsError, match="backbone.checkpoint_model='ema'"):
        build_backbone("dino_vits16", weights=path, checkpoint_model="ema")
    plain = save(dino_sd, tmp_path / "plain.pth")  # one network: the choice does not apply
    assert_loaded(build_backbone("dino_vits16", weights=plain, checkpoint_model="teacher"), dino_sd)


# ------------------------------------------------------------------------------------------------ this project


@pytest.fixture
def own_checkpoint(tmp_path):
    """A checkpoint written by this project's writer, holding a student and a teacher of vit_tiny."""
    def encoder(seed):
        backbone = build_backbone("vit_tiny", weights="random")
        return randomize_(DenseEncoder(backbone, ProjectionHead(128, 32, 16)), seed=seed)

    student, teacher = encoder(1), encoder(2)
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(), "objective": {},
             "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
             "scaler": {}, "step": 7, "epoch": 0, "batch_in_epoch": 7, "rng": rng_state(),
             "config": {"backbone": {"name": "vit_tiny", "weights": "random"}, "seed": 0}}
    path = save_checkpoint(state, tmp_path / "run", step=7, keep=1)
    return path, student.backbone, teacher.backbone


@pytest.mark.parametrize("choice", ["auto", "student", "teacher"])
def test_own_checkpoint_student_or_teacher(own_checkpoint, choice):
    path, student, teacher = own_checkpoint
    b = build_backbone("vit_tiny", weights=str(path), checkpoint_model=choice)
    assert_loaded(b, (teacher if choice == "teacher" else student).state_dict())


def test_own_checkpoint_of_another_backbone_names_it(own_checkpoint):
    with pytest.raises(WeightsError, match=r"trained with backbone.name=vit_tiny.*\(vit_tiny\)"):
        build_backbone("dino_vits16", weights=str(own_checkpoint[0]))


# ------------------------------------------------------------------------------------------------ export


def run_recipe(recipe):
    """Execute the printed one-line recipe; it must need nothing from this project."""
    namespace = {}
    exec(recipe, namespace)  # noqa: S102 - our own generated line
    assert not any(m.startswith("neco") for m in recipe.split())
    return namespace["m"].eval()


@pytest.mark.parametrize("fmt", ["timm", "safetensors"])
def test_export_loads_strictly_into_plain_timm(own_checkpoint, fmt, tmp_path):
    path, _, teacher = own_checkpoint
    out = export_backbone(str(path), fmt, tmp_path / "out", checkpoint_model="teacher")
    assert out.path.suffix == (".safetensors" if fmt == "safetensors" else ".pth")
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["backbone"] == "vit_tiny" and info["checkpoint_model"] == "teacher" and info["recipe"] == out.recipe
    plain = run_recipe(out.recipe)
    assert type(plain) is timm.models.VisionTransformer
    if fmt == "safetensors":
        assert set(load_file(str(out.path))) == set(plain.state_dict())
    x = torch.randn(2, 3, 112, 112)  # the stored grid: timm adds the position embeddings unchanged
    with torch.no_grad():
        theirs = plain.forward_features(x)[:, 1:].reshape(2, 14, 14, 128)
        assert torch.equal(theirs, teacher.eval()(x))


@needs_dinov2
def test_export_dinov2_hub_loads_into_the_dinov2_package(tmp_path, monkeypatch):
    shallow(monkeypatch, "dinov2_vits14")
    student = dinov2_small(seed=3)
    ckpt = {"state_dict": {**prefixed(student.state_dict(), "model."), **prefixed(student.state_dict(), "teacher.")}}
    path = save(ckpt, tmp_path / "neco.ckpt")
    out = export_backbone(path, "dinov2_hub", tmp_path / "out", backbone="dinov2_vits14")
    assert "torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14', pretrained=False)" in out.recipe
    fresh = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                                  init_values=1.0, block_chunks=0)
    fresh.load_state_dict(torch.load(out.path))  # strict
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        torch.testing.assert_close(tokens_of(fresh.eval(), x), tokens_of(student, x), rtol=0, atol=0)


@needs_dinov2
@pytest.mark.parametrize("name", ["vit_tiny", "small_swiglu"])
def test_export_dinov2_hub_recipe_builds_the_dinov2_model(name, tmp_path, monkeypatch):
    # The generic recipe (DinoVisionTransformer arguments) for sizes torch.hub does not name; ViT-g's SwiGLU.
    giant = BACKBONES["dinov2_vitg14"]
    monkeypatch.setitem(BACKBONES, "small_swiglu", dataclasses.replace(
        giant, family="other", embed_dim=96, img_size=112, timm_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 4}))
    b = randomize_(build_backbone(name, weights="random"), seed=4).eval()
    out = export_backbone(save(b.state_dict(), tmp_path / "w.pth"), "dinov2_hub", tmp_path / "out", backbone=name)
    theirs = run_recipe(out.recipe)
    x = torch.randn(2, 3, 56, 112)  # the dinov2 package wants whole patches
    with torch.no_grad():
        torch.testing.assert_close(tokens_of(theirs, x), b(x), rtol=1e-5, atol=1e-5)


def test_export_dinov2_hub_with_registers_round_trip(tmp_path, monkeypatch):
    # The dinov2 package on PyPI predates registers: checked by re-loading the export (hub layout) here.
    shallow(monkeypatch, "dinov2_vits14_reg")
    b = randomize_(build_backbone("dinov2_vits14_reg", weights="random"), seed=5).eval()
    out = export_backbone(save(b.state_dict(), tmp_path / "w.pth"), "dinov2_hub", tmp_path / "out",
                          backbone="dinov2_vits14_reg")
    hub = torch.load(out.path)
    assert hub["register_tokens"].shape == (1, 4, 384) and hub["pos_embed"].shape == (1, 1370, 384)
    assert "mask_token" in hub and "'dinov2_vits14_reg'" in out.recipe
    again = build_backbone("dinov2_vits14_reg", weights=str(out.path)).eval()
    x = torch.randn(1, 3, 84, 98)
    with torch.no_grad():
        torch.testing.assert_close(again(x), b(x), rtol=0, atol=0)


def test_export_cli(own_checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "neco.export", f"checkpoint={own_checkpoint[0]}", "format=safetensors",
           f"paths.output_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "exports" / "step_7_auto_safetensors"
    assert f"wrote {run_dir / 'vit_tiny_safetensors.safetensors'}" in done.stdout
    assert "load it with: import timm; from safetensors.torch import load_file" in done.stdout
    assert (run_dir / "export.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


def test_export_user_errors(own_checkpoint, tmp_path):
    plain = save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "plain.pth")
    with pytest.raises(ConfigError, match="does not record its backbone: set backbone=<name>"):
        export_backbone(plain, "timm", tmp_path / "out")
    with pytest.raises(ConfigError, match="format='onnx': choose one of timm, dinov2_hub, safetensors"):
        export_backbone(str(own_checkpoint[0]), "onnx", tmp_path / "out")
    with pytest.raises(WeightsError, match=r"checkpoint=.*nope\.pt: no such file"):
        export_backbone(str(tmp_path / "nope.pt"), "timm", tmp_path / "out")
