"""Training details that follow the reference by default, each against a float64 re-derivation of its description.

Foreground masks (reflect-padded blur, exact foreground-cell rule) and stochastic depth (DINOv2's batch-subset
form above rate 0.1) here; the CLS-position parameters and zero-loss steps in test_training_fidelity_steps.py.
Every option test checks that the option changes what it claims.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block

from neco.errors import ConfigError
from neco.loss import NeCoLoss
from neco.loss.masks import TRAINING_MASS_FRACTION, attention_foreground, foreground_cells, gaussian_blur
from neco.loss.neco import align
from neco.models.backbone import BACKBONES, BackboneSpec, create_vit
from neco.models.stochastic_depth import SubsetDropBlock, block_drop_rates

DT = torch.float64

# ------------------------------------------------------------------------------------------------ blur


def _gaussian_kernel(size=7, sigma=0.6):
    x = np.arange(size, dtype=np.float64) - size // 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return np.outer(k, k)


def _blur_rederived(maps: np.ndarray, padding: str) -> np.ndarray:
    """7x7 Gaussian (sigma 0.6) by explicit sums; `reflect` mirrors without repeating the edge, as torch's pad."""
    k = _gaussian_kernel()
    mode = {"reflect": "reflect", "zeros": "constant"}[padding]
    out = np.empty_like(maps)
    for n, m in enumerate(maps):
        p = np.pad(m, 3, mode=mode)
        for y in range(m.shape[0]):
            for x in range(m.shape[1]):
                out[n, y, x] = (p[y:y + 7, x:x + 7] * k).sum()
    return out


def test_blur_pads_by_reflection_by_default_and_zeros_on_request():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 9, 11, generator=g, dtype=DT)
    reflect = gaussian_blur(maps)
    np.testing.assert_allclose(reflect[:, 0].numpy(), _blur_rederived(maps[:, 0].numpy(), "reflect"), rtol=1e-12)
    zeros = gaussian_blur(maps, padding="zeros")
    np.testing.assert_allclose(zeros[:, 0].numpy(), _blur_rederived(maps[:, 0].numpy(), "zeros"), rtol=1e-12)
    # The two differ exactly within kernel_size // 2 = 3 cells of the border.
    differs = (reflect - zeros).abs()[:, 0] > 1e-12
    assert differs[:, :3].any() and differs[:, -3:].any()
    assert not differs[:, 3:-3, 3:-3].any()
    # Each (H, W) map is blurred alone, whatever the leading dimensions.
    assert torch.equal(gaussian_blur(maps[:, 0]), reflect[:, 0])
    with pytest.raises(ConfigError, match="loss.mask_blur_padding"):
        gaussian_blur(maps, padding="circular")


def test_foreground_mask_uses_the_reflect_blur_and_the_option_changes_border_cells():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(4, 3, 10, 10, generator=g) * 0.2
    attn[:, :, 0, :4] += 1.0  # mass along the top border, where the two paddings disagree
    attn[:, :, 5:8, 5:8] += 0.6
    fg = attention_foreground(attn, TRAINING_MASS_FRACTION)
    # Re-derived: blur the head mean, keep the most attended cells holding 60 % of the mass, drop components
    # of <= 2 cells (none here: each kept region is larger).
    blurred = _blur_rederived(attn.double().mean(dim=1).numpy(), "reflect")
    for n in range(4):
        flat = np.sort(blurred[n].ravel())
        cum = np.cumsum(flat / flat.sum())
        threshold = flat[np.argmax(cum > 0.4)]
        np.testing.assert_array_equal(fg[n].numpy(), blurred[n] >= threshold)
    fg_zeros = attention_foreground(attn, TRAINING_MASS_FRACTION, blur_padding="zeros")
    assert (fg != fg_zeros).any()


# ------------------------------------------------------------------------------------------------ fg cells


def _boxes_all_inside(batch, num, side, generator):
    """Random boxes (in token units) strictly inside a `side x side` map: every ROI sample is in the map."""
    lo = 0.5 + (side / 2 - 1) * torch.rand(batch, num, 2, generator=generator)
    hi = lo + 1 + (side - 1.5 - lo) * torch.rand(batch, num, 2, generator=generator)
    return torch.cat([lo, hi], dim=-1)


def test_foreground_cell_rule_is_exact_and_tolerant_keeps_rounding_losses():
    g = torch.Generator().manual_seed(2)
    side, k = 8, 7
    boxes = _boxes_all_inside(16, 6, side, g)
    ones = torch.ones(16, 1, side, side)
    aligned32 = align(ones, boxes, 1.0, k)
    aligned64 = align(ones.double(), boxes.double(), 1.0, k)
    # Every cell is covered by the mask: exactly 1 in exact arithmetic (float64 within rounding).
    torch.testing.assert_close(aligned64, torch.ones_like(aligned64), rtol=0, atol=1e-12)
    rounded = aligned32 < 1.0
    assert rounded.sum() > 0, "float32 ROI-align gave exactly 1 everywhere: no cell to tell the rules apart"
    exact, tolerant = foreground_cells(aligned32), foreground_cells(aligned32, "tolerant")
    # exact (reference): a cell counts only when its float32 aligned value reaches 1.0.
    assert torch.equal(exact, aligned32 >= 1.0) and not exact[rounded].any()
    # tolerant: every fully covered cell counts.
    assert tolerant.all()
    with pytest.raises(ConfigError, match="loss.fg_cell_rule"):
        foreground_cells(aligned32, "nearly")


def _loss_cfg(**kw):
    base = dict(student_steepness=100.0, teacher_steepness=100.0, network="bitonic", distribution="cauchy",
                art_lambda=0.25, similarity="cosine", references="batch", queue_length=8192, mask="all",
                roi_size=7, use_teacher=True, head=SimpleNamespace(out_dim=8), reference_source="teacher",
                queue_counter="shared", teacher_head_init="independent", box_scale="patch", sorter="sparse",
                mask_blur_padding="reflect", fg_cell_rule="exact")
    return SimpleNamespace(**{**base, **kw})


def test_fg_cell_rule_changes_the_cells_the_loss_uses():
    # An all-foreground mask: `tolerant` uses every cell (the unmasked loss), `exact` drops the cells whose
    # float32 aligned value rounds below 1, so its loss differs.
    g = torch.Generator().manual_seed(3)
    batch, patch, sizes = 4, 8, [64, 64, 32]
    maps = [torch.nn.functional.normalize(torch.randn(batch, 8, s // patch, s // patch, generator=g), dim=1)
            for s in sizes]
    boxes = {"gc": torch.zeros(batch, 2, 3, 4), "all": torch.zeros(batch, 3, 2, 4)}
    for t in range(2):
        for v in range(3):
            boxes["gc"][:, t, v] = _boxes_all_inside(batch, 1, 8, g)[:, 0] * patch
            boxes["all"][:, v, t] = _boxes_all_inside(batch, 1, sizes[v] // patch, g)[:, 0] * patch
    full = torch.ones(2, batch, 1, 8, 8)
    scale = 1.0 / patch
    rounded = sum(int((align(full[t], boxes["gc"][:, t], scale, 7) < 1.0).sum()) for t in range(2))
    assert rounded > 0
    losses = {}
    for name, cfg in (("all", _loss_cfg()), ("exact", _loss_cfg(mask="fg")),
                      ("tolerant", _loss_cfg(mask="fg", fg_cell_rule="tolerant"))):
        torch.manual_seed(0)
        losses[name] = NeCoLoss(cfg, patch, sizes, 2, batch)(maps, maps[:2], boxes, full)
    torch.testing.assert_close(losses["tolerant"], losses["all"])
    assert not torch.allclose(losses["exact"], losses["all"])


# ------------------------------------------------------------------------------------------------ stochastic depth

SMALL = {"patch_size": 8, "embed_dim": 16, "depth": 12, "num_heads": 2}
SPECS = {
    "v1": BackboneSpec("vit_small_patch16_224", 8, 16, "dino", img_size=32, timm_kwargs=SMALL),
    "v2": BackboneSpec("vit_small_patch14_dinov2", 8, 16, "dinov2", img_size=32,
                       timm_kwargs={**SMALL, "init_values": 1.0}),
}


def test_drop_rates_are_linear_in_float32_and_only_the_last_v2_block_takes_the_subset_path():
    expected = [float(np.float32(0.1) * np.float32(i) / np.float32(11)) for i in range(12)]
    for version, spec in SPECS.items():
        vit = create_vit(spec, drop_path_rate=0.1)
        rates = block_drop_rates(vit.blocks)
        np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=0)
        assert rates[-1] == float(np.float32(0.1)) > 0.1 and rates[-2] < 0.1
        subset = [type(b) is SubsetDropBlock for b in vit.blocks]
        assert subset == ([False] * 11 + [True] if version == "v2" else [False] * 12), version
        # per_sample: timm's DropPath in every block, whatever the family.
        plain = create_vit(spec, drop_path_rate=0.1, drop_path_mode="per_sample")
        assert all(type(b) is Block for b in plain.blocks)
    assert BACKBONES["vit_tiny"].family == "tiny"  # DINOv2-style blocks (LayerScale): the subset rule too
    assert type(create_vit(BACKBONES["vit_tiny"], drop_path_rate=0.1).blocks[-1]) is SubsetDropBlock
    with pytest.raises(ConfigError, match="backbone.drop_path_mode"):
        create_vit(SPECS["v2"], drop_path_rate=0.1, drop_path_mode="uniform")


def _last_block(mode):
    torch.manual_seed(0)
    vit = create_vit(SPECS["v2"], drop_path_rate=0.1, drop_path_mode=mode).double()
    return vit.blocks[-1].train()


def _branches(block):
    return (lambda t: block.ls1(block.attn(block.norm1(t))), lambda t: block.ls2(block.mlp(block.norm2(t))))


@torch.no_grad()
def test_subset_stochastic_depth_matches_the_dinov2_description():
    block = _last_block("reference")
    rate = float(np.float32(0.1))
    b = 10
    x = torch.randn(b, 5, 16, dtype=DT)
    torch.manual_seed(7)
    ours = block(x)
    # Re-derived: per branch, a random subset of max(int(B (1 - rate)), 1) samples gets the branch scaled by B/subset.
    torch.manual_seed(7)
    subset = max(int(b * (1 - rate)), 1)
    assert subset == 8  # 10 * 0.89999999851 = 8.99...: the float32 rate leaves 8 of 10, not 9
    expected = x.clone()
    for branch in _branches(block):
        keep = torch.randperm(b)[:subset]
        updated = expected.clone()
        updated[keep] = expected[keep] + (b / subset) * branch(expected[keep])
        expected = updated
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    block.eval()  # no stochastic depth at evaluation: the plain block
    plain = x + _branches(block)[0](x)
    torch.testing.assert_close(block(x), plain + _branches(block)[1](plain), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_per_sample_option_drops_whole_samples_with_rescaling():
    block = _last_block("per_sample")
    rate = float(np.float32(0.1))
    b = 10
    x = torch.randn(b, 5, 16, dtype=DT)
    torch.manual_seed(7)
    ours = block(x)
    torch.manual_seed(7)
    expected = x
    for branch in _branches(block):  # timm's DropPath: Bernoulli(1 - rate) per sample, kept ones / (1 - rate)
        keep = torch.empty(b, 1, 1, dtype=DT).bernoulli_(1 - rate) / (1 - rate)
        expected = expected + keep * branch(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    # The reference's subset form gives another output from the same random state.
    torch.manual_seed(7)
    assert not torch.allclose(_last_block("reference")(x), ours)


def test_teacher_blocks_run_without_stochastic_depth():
    from neco.engine.setup import _disable_drop_path

    block = _last_block("reference")
    _disable_drop_path(block)
    x = torch.randn(6, 5, 16, dtype=DT)
    with torch.no_grad():
        torch.manual_seed(1)
        a = block(x)
        torch.manual_seed(2)
        assert torch.equal(a, block(x)) and math.isclose(block_drop_rates([block])[0], 0.0)
