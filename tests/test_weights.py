"""The torch.hub DINOv2 and timm layouts, checked against producers that are not our code (files and sources:
test_weights_files.py).

The DINOv2 layout comes from the ``dinov2`` package (0.0.1.dev2 on PyPI, the official model code, which predates
registers) when it is installed, and otherwise from a timm model plus ``mask_token``. Registers are checked
against timm's own conversion and forward of the official register checkpoints. ``hub_reference`` is a
DINOv2/DINO forward written from METHOD.md §2.1-2.3 on the checkpoint tensors, itself checked against the
``dinov2`` package. Layouts of other projects (NeCo,
Leopart, TimeT, DINO, this project) are tested in test_export.py.
"""

import dataclasses
import logging
import math
import urllib.error
import urllib.request
import urllib.response

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from timm.models.vision_transformer import checkpoint_filter_fn

from neco.models import BACKBONES, WeightsError, build_backbone
from neco.models.backbone import BackboneSpec, create_vit

try:
    from dinov2.models.vision_transformer import DinoVisionTransformer, vit_small
except ImportError:  # optional dev dependency: `pip install --no-deps dinov2==0.0.1.dev2`
    DinoVisionTransformer = vit_small = None

needs_dinov2 = pytest.mark.skipif(vit_small is None, reason="dinov2==0.0.1.dev2 not installed")


@torch.no_grad()
def hub_reference(sd, x, num_heads, patch):
    """Final-norm patch tokens of a DINOv2 (or DINO, without LayerScale) ViT, from its checkpoint tensors."""
    B, _, H, W = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    D, h, w = t.shape[1:]
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    pos, m = sd["pos_embed"], math.isqrt(sd["pos_embed"].shape[1] - 1)
    if not (h * w == m * m and H == W):
        grid = pos[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)
    t = t + pos
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hd = D // num_heads
    for i in range(depth):
        def b(n, i=i):
            return sd[f"blocks.{i}.{n}"]

        y = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, b("attn.qkv.weight"), b("attn.qkv.bias")).reshape(B, -1, 3, num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, D), b("attn.proj.weight"), b("attn.proj.bias"))
        t = t + sd.get(f"blocks.{i}.ls1.gamma", 1.0) * a
        y = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        y = F.gelu(F.linear(y, b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        y = F.linear(y, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        t = t + sd.get(f"blocks.{i}.ls2.gamma", 1.0) * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, t.shape[1] - h * w:].reshape(B, h, w, D)


@pytest.fixture(scope="module")
def dinov2_model():
    if vit_small is None:
        return None
    return randomize_(vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), seed=3).eval()


@pytest.fixture(scope="module")
def hub_sd(dinov2_model):
    """A ViT-S/14 state dict in torch.hub DINOv2 layout (pos_embed 1+37², mask_token, ls1.gamma, ...)."""
    if dinov2_model is not None:
        return {k: v.detach().clone() for k, v in dinov2_model.state_dict().items()}
    vit = randomize_(create_vit(BACKBONES["dinov2_vits14"]), seed=3)
    return {**vit.state_dict(), "mask_token": torch.zeros(1, 384)}


@pytest.fixture(scope="module")
def hub_reg_sd(hub_sd):
    g = torch.Generator().manual_seed(4)
    return {**hub_sd, "register_tokens": torch.randn(1, 4, 384, generator=g)}


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def shallow(monkeypatch, name, depth=2):
    """Make registry entry `name` build with `depth` blocks (width, patch, grid, registers unchanged)."""
    spec = BACKBONES[name]
    spec = dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": depth})
    monkeypatch.setitem(BACKBONES, name, spec)


def first_blocks(sd, depth=2):
    """The same checkpoint cut to its first `depth` blocks: a valid shallower network."""
    return {k: v for k, v in sd.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}


def tokens_of(model, x):
    """Patch tokens ``(B, h, w, D)`` of a ``dinov2`` package model."""
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return model.forward_features(x)["x_norm_patchtokens"].reshape(x.shape[0], h, w, -1)


def dinov2_depth2(sd):
    """The ``dinov2`` package's ViT-S/14 with two blocks, loaded strictly with ``sd``."""
    model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                                  init_values=1.0, block_chunks=0)
    model.load_state_dict(sd)
    return model.eval()


# ------------------------------------------------------------------------------------------------ DINOv2 hub


@needs_dinov2
def test_reference_matches_dinov2_package(dinov2_model, hub_sd):
    x = torch.randn(2, 3, 126, 98)
    with torch.no_grad():
        torch.testing.assert_close(hub_reference(hub_sd, x, 6, 14), tokens_of(dinov2_model, x), rtol=1e-5, atol=1e-5)


def test_dinov2_hub_checkpoint(dinov2_model, hub_sd, tmp_path):
    b = build_backbone("dinov2_vits14", weights=save(hub_sd, tmp_path / "hub.pth")).eval()
    for size in [(224, 224), (98, 98), (126, 98)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            theirs = tokens_of(dinov2_model, x) if dinov2_model is not None else hub_reference(hub_sd, x, 6, 14)
            torch.testing.assert_close(b(x), theirs, rtol=1e-5, atol=1e-5)


@needs_dinov2
def test_timm_layout_from_timms_own_checkpoint_filter(dinov2_model, hub_sd, tmp_path):
    # timm's checkpoint_filter_fn is how timm itself turns the official DINOv2 files into its layout.
    import timm

    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    timm_sd = checkpoint_filter_fn(dict(hub_sd), ref)
    ref.load_state_dict(timm_sd)
    b = build_backbone("dinov2_vits14", weights=save(timm_sd, tmp_path / "timm.pth")).eval()
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        torch.testing.assert_close(b(x), tokens_of(dinov2_model, x), rtol=1e-5, atol=1e-5)


def test_dinov2_hub_checkpoint_with_registers(hub_reg_sd, tmp_path, monkeypatch):
    import timm

    shallow(monkeypatch, "dinov2_vits14_reg")
    hub_reg_sd = first_blocks(hub_reg_sd)
    b = build_backbone("dinov2_vits14_reg", weights=save(hub_reg_sd, tmp_path / "reg.pth")).eval()
    torch.testing.assert_close(b.reg_token, hub_reg_sd["register_tokens"])
    # Against timm's own conversion and forward of the official register checkpoints (at the stored grid,
    # where timm does not resample position embeddings).
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, depth=2)
    ref.load_state_dict(checkpoint_filter_fn(dict(hub_reg_sd), ref))
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref.eval().forward_features(x)[:, 5:].reshape(1, 37, 37, 384),
                                   rtol=1e-5, atol=1e-5)
    for size in [(224, 224), (98, 126)]:  # other sizes: DINOv2's interpolation (METHOD.md §2.3)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(b(x), hub_reference(hub_reg_sd, x, 6, 14), rtol=1e-5, atol=1e-5)


@needs_dinov2
def test_xr_drops_registers_and_says_so(hub_sd, hub_reg_sd, tmp_path, caplog, monkeypatch):
    shallow(monkeypatch, "dinov2_vits14_xr")
    with caplog.at_level(logging.WARNING):
        b = build_backbone("dinov2_vits14_xr", weights=save(first_blocks(hub_reg_sd), tmp_path / "reg.pth")).eval()
    assert "register_tokens" in caplog.text and "XR" in caplog.text
    assert b.num_register_tokens == 0
    x = torch.randn(2, 3, 98, 112)
    with torch.no_grad():  # the producer's network of the same weights without registers
        torch.testing.assert_close(b(x), tokens_of(dinov2_depth2(first_blocks(hub_sd)), x), rtol=1e-5, atol=1e-5)


def test_xr_from_timm_register_layout(hub_sd, hub_reg_sd, tmp_path, monkeypatch):
    # timm's reg4 layout folds the CLS position embedding into cls_token; XR must undo that exactly.
    shallow(monkeypatch, "dinov2_vits14_reg")
    shallow(monkeypatch, "dinov2_vits14_xr")
    hub_sd, hub_reg_sd = first_blocks(hub_sd), first_blocks(hub_reg_sd)
    reg = build_backbone("dinov2_vits14_reg", weights=save(hub_reg_sd, tmp_path / "reg.pth"))
    xr = build_backbone("dinov2_vits14_xr", weights=save(reg.state_dict(), tmp_path / "timm_reg.pth")).eval()
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(xr(x), hub_reference(hub_sd, x, 6, 14), rtol=1e-5, atol=1e-5)


@needs_dinov2
@pytest.mark.parametrize("block_chunks", [0, 2])
def test_swiglu_and_chunked_blocks(block_chunks, tmp_path, monkeypatch):
    # ViT-g/14's SwiGLU FFN at a small width (96 keeps DINOv2's and timm's hidden sizes equal).
    theirs = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=96, depth=2, num_heads=4,
                                   init_values=1.0, ffn_layer="swiglufused", block_chunks=block_chunks)
    theirs = randomize_(theirs, seed=5).eval()
    giant = BACKBONES["dinov2_vitg14"]
    spec = dataclasses.replace(giant, embed_dim=96, timm_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 4})
    monkeypatch.setitem(BACKBONES, "small_swiglu", spec)
    path = save(theirs.state_dict(), tmp_path / "g.pth")
    assert any(".mlp.w12." in k for k in torch.load(path))
    b = build_backbone("small_swiglu", weights=path).eval()
    x = torch.randn(2, 3, 98, 112)
    with torch.no_grad():
        torch.testing.assert_close(b(x), tokens_of(theirs, x), rtol=1e-5, atol=1e-5)


def test_default_weights_from_cache_without_network(hub_sd, tmp_path, monkeypatch):
    def offline(url, *a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    shallow(monkeypatch, "dinov2_vits14")
    hub_sd = first_blocks(hub_sd)
    save(hub_sd, tmp_path / "dinov2_vits14_pretrain.pth")  # where the default URL's file is cached
    b = build_backbone("dinov2_vits14", cache_dir=tmp_path)
    torch.testing.assert_close(b.pos_embed, hub_sd["pos_embed"])


# ------------------------------------------------------------------------------------------------ mismatches


def test_wrong_architecture_names_backbone_name(hub_sd, tmp_path, monkeypatch):
    shallow(monkeypatch, "dinov2_vitb14")
    with pytest.raises(WeightsError) as e:
        build_backbone("dinov2_vitb14", weights=save(first_blocks(hub_sd), tmp_path / "s.pth"))
    msg = str(e.value)
    assert "width 384, 2 blocks, patch 14, 0 registers" in msg and "width 768" in msg
    assert "backbone.name" in msg and "dinov2_vits14" in msg and "strict=false" not in msg
    wide = dataclasses.replace(BACKBONES["vit_tiny"], embed_dim=64,
                               timm_kwargs={**BACKBONES["vit_tiny"].timm_kwargs, "embed_dim": 64})
    monkeypatch.setitem(BACKBONES, "tiny64", wide)
    path = save(build_backbone("tiny64", weights="random").state_dict(), tmp_path / "t64.pth")
    with pytest.raises(WeightsError, match=r"with a different shape: .*\(1, 1, 64\) vs model \(1, 1, 128\)"):
        build_backbone("vit_tiny", weights=path)
    with pytest.raises(WeightsError, match="Nothing matches"):
        build_backbone("vit_tiny", weights=path, strict=False)


def test_register_weights_into_plain_model_suggest_xr(tmp_path, monkeypatch):
    spec = BACKBONES["vit_tiny"]
    reg = BackboneSpec(spec.timm_name, 8, 128, "tiny", num_register_tokens=4, img_size=112,
                       timm_kwargs={**spec.timm_kwargs, "reg_tokens": 4, "no_embed_class": True})
    monkeypatch.setitem(BACKBONES, "tiny_reg", reg)
    path = save(build_backbone("tiny_reg", weights="random").state_dict(), tmp_path / "r.pth")
    with pytest.raises(WeightsError, match="'_xr'"):
        build_backbone("vit_tiny", weights=path)


def test_not_a_backbone_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="no ViT backbone weights"):
        build_backbone("vit_tiny", weights=save({"foo": torch.zeros(1)}, tmp_path / "x.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        build_backbone("vit_tiny", weights=str(tmp_path / "junk.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        build_backbone("vit_tiny", weights=str(tmp_path / "junk.safetensors"))


def test_register_mismatch_in_hub_layout_is_reported(hub_sd, hub_reg_sd, tmp_path, monkeypatch):
    shallow(monkeypatch, "dinov2_vits14")
    shallow(monkeypatch, "dinov2_vits14_reg")
    with pytest.raises(WeightsError, match=r"(?s)unexpected.*reg_token.*'_xr'"):
        build_backbone("dinov2_vits14", weights=save(first_blocks(hub_reg_sd), tmp_path / "reg.pth"))
    # The register model keeps DINOv2's CLS entry in pos_embed, so only the registers are missing.
    with pytest.raises(WeightsError, match=r"(?s)missing.*reg_token.*0 registers.*dinov2_vits14_xr"):
        build_backbone("dinov2_vits14_reg", weights=save(first_blocks(hub_sd), tmp_path / "plain.pth"))


def test_other_patch_size_is_not_resampled(hub_sd, tmp_path, monkeypatch):
    shallow(monkeypatch, "dino_vits16")
    with pytest.raises(WeightsError, match=r"patch_embed\.proj\.weight weights \(384, 3, 14, 14\)"):
        build_backbone("dino_vits16", weights=save(first_blocks(hub_sd), tmp_path / "p14.pth"))
