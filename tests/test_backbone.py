"""Backbone registry, position-embedding interpolation, shapes, attention maps, and the projection head."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from neco.models import BACKBONES, ProjectionHead, build_backbone
from neco.models.backbone import create_vit


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(build_backbone("vit_tiny", weights="random")).eval()


@pytest.fixture(scope="module")
def vits14():
    return randomize_(build_backbone("dinov2_vits14", weights="random"), seed=1).eval()


@pytest.fixture(scope="module")
def vits14_reg():
    return randomize_(build_backbone("dinov2_vits14_reg", weights="random"), seed=2).eval()


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_sources():
    expected = {f"dinov2_vit{s}14{v}" for s in "sblg" for v in ("", "_reg", "_xr")}
    expected |= {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "vit_tiny"}
    assert set(BACKBONES) == expected
    for s in "sblg":
        plain, reg, xr = (BACKBONES[f"dinov2_vit{s}14{v}"] for v in ("", "_reg", "_xr"))
        assert plain.weights_url.endswith(f"dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth")
        assert reg.weights_url.endswith(f"dinov2_vit{s}14/dinov2_vit{s}14_reg4_pretrain.pth")
        assert xr.weights_url == reg.weights_url and xr.drop_registers and xr.num_register_tokens == 0
        assert reg.num_register_tokens == 4 and plain.num_register_tokens == 0
        assert xr.timm_name == plain.timm_name
    assert BACKBONES["dino_vitb8"].weights_url == (
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain_full_checkpoint.pth")
    assert BACKBONES["vit_tiny"].weights_url is None


def test_registry_builds_matching_timm_models():
    # On the meta device (no memory) and with one block: width, patch, registers, FFN do not depend on depth.
    with torch.device("meta"):
        for name, spec in BACKBONES.items():
            vit = create_vit(dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": 1}))
            assert vit.embed_dim == spec.embed_dim, name
            assert vit.patch_embed.patch_size == (spec.patch_size, spec.patch_size), name
            assert vit.num_reg_tokens == spec.num_register_tokens, name
            grid = spec.img_size // spec.patch_size
            assert vit.pos_embed.shape[1] == grid * grid + (0 if vit.no_embed_class else 1), name
            mlp = vit.blocks[0].mlp
            if spec.family == "dinov2":
                assert grid == 37 and vit.blocks[0].ls1.gamma.shape == (spec.embed_dim,)
            if name.startswith("dinov2_vitg14"):
                # Official ViT-g/14 FFN is SwiGLU with 4096 hidden units: the packed w12 is 2 x 4096 wide.
                assert mlp.fc1.out_features == 8192 and mlp.fc2.in_features == 4096, name
                assert isinstance(mlp.act, torch.nn.SiLU), name
            else:
                assert mlp.fc1.out_features == 4 * spec.embed_dim and isinstance(mlp.act, torch.nn.GELU), name


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="Valid names:.*dinov2_vits14_reg.*vit_tiny"):
        build_backbone("dinov3_vits14", weights="random")


def test_drop_path_is_linear_per_block():
    b = build_backbone("vit_tiny", weights="random", drop_path_rate=0.3)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in b.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, len(b.blocks)).tolist())


# ------------------------------------------------------------------------------------------------ pos-embed


def dinov2_pos_embed(pos_embed, H, W, p):
    """DINOv2's interpolate_pos_encoding, re-derived from METHOD.md §2.3 (CLS entry first)."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    h, w = H // p, W // p
    if h * w == n and H == W:
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


SIZES = [(224, 224, 16, 16), (98, 98, 7, 7), (224, 98, 16, 7), (448, 448, 32, 32)]


@pytest.mark.parametrize("H,W,h,w", SIZES, ids=["224", "98", "224x98", "448"])
def test_pos_embed_interpolation_is_dinov2s(vits14, H, W, h, w):
    with torch.no_grad():
        ours = vits14._pos_embed_for(h, w, H == W)
        ref = dinov2_pos_embed(vits14.pos_embed, H, W, 14)
        # The scale-factor formula is not the same function as resizing to (h, w): the check can fail.
        by_size = F.interpolate(vits14.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
                                size=(h, w), mode="bicubic")
    assert ours.shape == (1, 1 + h * w, 384)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, h * w, -1), atol=1e-4)


def test_stored_grid_used_unchanged_at_518(vits14):
    assert torch.equal(vits14._pos_embed_for(37, 37, True), vits14.pos_embed)
    # Same patch count but a non-square input in pixels: DINOv2 interpolates (scale 37.1 / 37).
    assert not torch.equal(vits14._pos_embed_for(37, 37, False), vits14.pos_embed)


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("H,W", [(64, 64), (32, 32), (112, 112), (70, 45), (8, 120)])
def test_tiny_shapes_and_extra_pixels_dropped(tiny, H, W):
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = tiny(x)
        cropped = tiny(x[:, :, : H // 8 * 8, : W // 8 * 8])
    assert out.shape == (2, H // 8, W // 8, 128)
    if H == W or (H // 8 * 8 == H and W // 8 * 8 == W):
        torch.testing.assert_close(out, cropped)


def test_registers_are_computed_but_not_returned(vits14, vits14_reg):
    with torch.device("meta"):
        xr = build_backbone("dinov2_vits14_xr", weights="random")
    assert (vits14_reg.num_register_tokens, vits14_reg.num_prefix_tokens) == (4, 5)
    assert (vits14.num_register_tokens, vits14.num_prefix_tokens) == (0, 1)
    assert (xr.num_register_tokens, xr.reg_token) == (0, None)
    assert "reg_token" in vits14_reg.state_dict() and "reg_token" not in xr.state_dict()
    x = torch.randn(2, 3, 98, 126)
    with torch.no_grad():
        assert vits14_reg(x).shape == vits14(x).shape == (2, 7, 9, 384)
        tokens, _, _ = vits14_reg._tokens(x)
    assert tokens.shape[1] == 5 + 63
    # Registers sit right after CLS and carry no position embedding.
    torch.testing.assert_close(tokens[:, 1:5], vits14_reg.reg_token.expand(2, -1, -1))


def test_state_dict_is_plain_timm(vits14_reg):
    import timm

    with torch.device("meta"):
        ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in vits14_reg.timm_state_dict().items()} == shapes
    # The training parameters are DINOv2's: pos_embed keeps its CLS entry (backbone.cls_position=separate).
    assert vits14_reg.state_dict()["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    folded = build_backbone("dinov2_vits14_reg", weights="random", cls_position="folded")
    assert {k: v.shape for k, v in folded.state_dict().items()} == shapes


def test_every_parameter_gets_a_gradient():
    b = build_backbone("vit_tiny", weights="random", drop_path_rate=0.1)
    (b(torch.randn(4, 3, 64, 64)).square().mean() + b(torch.randn(8, 3, 32, 32)).square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in b.parameters())


# ------------------------------------------------------------------------------------------------ attention


def timm_explicit_cls_attention(backbone, x):
    """The last block's softmax attention as timm's non-fused path computes it, captured from attn_drop."""
    attn = backbone.blocks[-1].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    attn.fused_attn = False
    try:
        backbone(x)
    finally:
        attn.fused_attn = True
        handle.remove()
    return seen[0][:, :, 0, backbone.num_prefix_tokens:]


@pytest.mark.parametrize("model,size", [("tiny", (64, 48)), ("vits14_reg", (42, 56)), ("vits14", (28, 28))])
def test_forward_with_attention(model, size, request):
    b = request.getfixturevalue(model)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        tokens, attn = b.forward_with_attention(x)
        ref = timm_explicit_cls_attention(b, x)
        plain = b(x)
    h, w = size[0] // b.patch_size, size[1] // b.patch_size
    assert attn.shape == (3, b.num_heads, h, w)
    torch.testing.assert_close(tokens, plain)
    torch.testing.assert_close(attn.flatten(2), ref, rtol=1e-5, atol=1e-6)
    sums = attn.sum(dim=(-1, -2))
    assert (attn >= 0).all() and (sums <= 1 + 1e-5).all()
    if b.num_register_tokens:
        assert (sums < 1).all()  # CLS and the registers hold part of the mass


# ------------------------------------------------------------------------------------------------ head


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_shapes_unit_norm_and_init(num_layers):
    torch.manual_seed(0)
    head = ProjectionHead(128, hidden_dim=64, out_dim=32, num_layers=num_layers)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == num_layers
    assert [m.out_features for m in linears] == [64] * (num_layers - 1) + [32]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.modules()) == num_layers - 1
    assert all((m.bias == 0).all() and 0.015 < m.weight.std() < 0.025 for m in linears)
    out = head(torch.randn(2, 5, 7, 128))
    assert out.shape == (2, 5, 7, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 5, 7))


def test_head_defaults_match_spec():
    head = ProjectionHead(384)
    dims = [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert dims == [(384, 2048), (2048, 2048), (2048, 256)]
