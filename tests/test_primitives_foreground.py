"""The one attention-foreground implementation (neco.loss.masks) and the parameters each of its users passes.

Hand-made maps show what each named parameter changes; saved outputs pin, bit for bit, what each user computes
with the parameters it passes: the fg/bg loss masks (METHOD.md §3.8), the unsupervised noisy foreground (§6.5.2)
and the attention monitor (§6.6). A change that moves any user's numbers fails here.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import neco.config  # noqa: F401
import neco.engine.trainer
import neco.heldout
import neco.loss.masks
from neco.eval.context import typed_options
from neco.eval.monitors import attention_jaccards
from neco.eval.unsupervised import protocol as unsup
from neco.loss.masks import (
    TRAINING_MASS_FRACTION,
    attention_foreground,
    drop_small_components,
    gaussian_blur,
    keep_mass,
    teacher_foreground,
)
from neco.train import train

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ blur padding


def test_reflect_blur_keeps_a_constant_map_and_zeros_darkens_its_border():
    ones = torch.ones(2, 9, 9)
    reflect = gaussian_blur(ones)
    zeros = gaussian_blur(ones, padding="zeros")
    torch.testing.assert_close(reflect, ones)  # mirrored padding: nothing leaves the map
    torch.testing.assert_close(zeros[:, 3:-3, 3:-3], ones[:, 3:-3, 3:-3])  # beyond the kernel's reach: the same
    ring = torch.ones(9, 9, dtype=torch.bool)
    ring[3:-3, 3:-3] = False
    assert (zeros[:, ring] < 1 - 1e-6).all()  # within kernel_size // 2 = 3 cells of the border: lower
    # The corner keeps the 4 x 4 taps of the 7 x 7 kernel that fall inside the map.
    x = torch.arange(7, dtype=torch.float64) - 3
    k = torch.exp(-(x**2) / (2 * 0.6**2))
    k = k / k.sum()
    assert float(zeros[0, 0, 0]) == pytest.approx(float(k[3:].sum()) ** 2, rel=1e-6)


def test_padding_decides_which_of_two_equal_objects_is_foreground():
    # Two equal 2 x 2 objects, one in the corner: reflect mirrors its blurred mass back into the map, so it
    # ranks first; zeros loses that mass past the border, so the interior object ranks first.
    attn = torch.full((1, 1, 10, 10), 0.001)
    attn[0, 0, :2, :2] = 1.0
    attn[0, 0, 5:7, 5:7] = 1.0
    corner = torch.zeros(10, 10, dtype=torch.bool)
    corner[:2, :2] = True
    interior = torch.zeros(10, 10, dtype=torch.bool)
    interior[5:7, 5:7] = True
    assert torch.equal(attention_foreground(attn, 0.45)[0], corner)
    assert torch.equal(attention_foreground(attn, 0.45, blur_padding="zeros")[0], interior)


def test_reflect_needs_more_cells_than_half_the_kernel_and_says_so():
    tiny = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="larger than 3 cells a side, got 3x3"):
        attention_foreground(tiny, TRAINING_MASS_FRACTION)
    assert attention_foreground(tiny, TRAINING_MASS_FRACTION, blur_padding="zeros").shape == (1, 3, 3)


# ------------------------------------------------------------------------------------------------ mass rule


def test_keep_mass_is_strict_and_keeps_at_least_the_fraction():
    # Masses exact in binary: ascending 1/16, 3/16, 4/16, 8/16 -> cumulative 1/16, 4/16, 8/16, 16/16.
    grid = torch.tensor([[0.5, 0.25], [0.1875, 0.0625]])
    kept = keep_mass(grid[None], 0.75)[0]
    # 1 - 0.75 = 4/16: the 3/16 cell, whose cumulative mass equals 4/16 exactly, is not above it (strict).
    assert kept.tolist() == [[True, True], [False, False]]
    assert float(grid[kept].sum()) == 0.75
    assert keep_mass(grid[None], 0.76)[0].tolist() == [[True, True], [True, False]]  # just more: the next cell
    assert not keep_mass(torch.zeros(1, 2, 2), 0.6).any()  # no mass, nothing kept (no NaN)


def test_training_and_unsupervised_fractions_keep_different_objects():
    # A strong and a weaker 3 x 3 object: 60 % of the mass (§3.8, §6.6) holds only the strong one, 65 %
    # (§6.5.2) lets part of the weaker one in.
    attn = torch.full((1, 1, 12, 12), 0.001)
    attn[0, 0, 2:5, 2:5] = 1.0
    attn[0, 0, 7:10, 7:10] = 0.35
    strong = torch.zeros(12, 12, dtype=torch.bool)
    strong[2:5, 2:5] = True
    at_60 = attention_foreground(attn, TRAINING_MASS_FRACTION)[0]
    at_65 = attention_foreground(attn, 0.65)[0]
    assert torch.equal(at_60, strong)
    assert torch.equal(at_65[:6, :6], strong[:6, :6]) and int(at_65[6:, 6:].sum()) == 3


# ------------------------------------------------------------------------------------------------ components


def test_min_size_drops_smaller_8_connected_components():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[0, 0, 0, 0] = True  # 1 cell
    m[0, 0, 2, 0] = m[0, 0, 3, 1] = True  # 2 cells touching by a corner: one 8-connected component
    m[0, 0, 0, 4:7] = True  # 3 cells
    m[0, 0, 5:7, 5:7] = True  # 4 cells
    sizes = {1: [(0, 0)], 2: [(2, 0)], 3: [(0, 4)], 4: [(5, 5)]}

    def kept(min_size):
        out = drop_small_components(m, min_size)[0, 0]
        return sorted(size for size, cells in sizes.items() if out[cells[0]])

    assert kept(1) == [1, 2, 3, 4]
    assert kept(3) == [3, 4]  # every user: components of at most 2 cells removed
    assert kept(4) == [4]
    assert int(drop_small_components(m, 3).sum()) == 7  # the kept components whole, nothing else


def test_min_size_through_the_pipeline():
    attn = torch.full((1, 1, 12, 12), 0.001)
    attn[0, 0, 2:5, 2:5] = 1.0
    attn[0, 0, 7:10, 7:10] = 0.45  # 60 % of the mass takes 3 cells of this object
    assert int(attention_foreground(attn, 0.6)[0, 6:, 6:].sum()) == 3
    assert int(attention_foreground(attn, 0.6, min_size=4)[0, 6:, 6:].sum()) == 0


# ------------------------------------------------------------------------------------------------ the users

# Each user's outputs on the maps of _maps(), saved from the code the published numbers were computed with:
# the masks as np.packbits hex (3 x 14 x 14 cells), the monitor's Jaccards as float.hex.
SAVED = {
    "training": ("23306cc07f39dc763608b82b31a007e007f1e77f49d867f192f50fdb7f6dbd0d2205dc023c"
                 "f3e119a1c49f03ec0e2b38633ca367bc13330c739dea73ff9cf961e00c8000004007187ef0"),
    "training_zeros": ("20207cc07f39dc76361cac2b11b007e007f1e73fd9dc676190700fda7f6dbd07320ddc0638"
                       "f7e15d81c4df03ec0e2f08431c8167bc1b330c739dea73ff9cf961e01c8080804407387ee0"),
    "unsupervised": ("23fc7cc07f39dc76361cbc2b31b007e007f1e77fd9d867f19ef50fdb7f6dbd0d320ddc063c"
                     "f3e15da1c4df03ec1e2f78633da367bc9b330c739dee73ff9cf961e21c8082c0440f387ef0"),
    "monitor_merged": ["0x1.a904be1ba5fdcp-2", "0x1.9bd25fd063fadp-2", "0x1.7a8a5013698dfp-2"],
    "monitor_best_head": ["0x1.207df5ee4a350p-3", "0x1.35d6a936e8decp-3", "0x1.213f3c3510b18p-3"],
}


def _maps():
    """Peaky 6-head attention on a 14 x 14 grid (ViT-S/16 at 224 px) and labels at 4 px per token."""
    attn = torch.rand(3, 6, 14, 14, generator=torch.Generator().manual_seed(7)) ** 4
    labels = torch.randint(0, 3, (3, 56, 56), generator=torch.Generator().manual_seed(8))
    labels[:, 20, :] = 255
    return attn, labels


def _bits(mask: torch.Tensor) -> str:
    return np.packbits(mask.numpy().astype(bool).ravel()).tobytes().hex()


def test_saved_outputs_tell_the_users_apart():
    assert len({SAVED["training"], SAVED["training_zeros"], SAVED["unsupervised"]}) == 3


@pytest.mark.parametrize("padding,key", [("reflect", "training"), ("zeros", "training_zeros")])
def test_training_masks_reproduce_the_saved_outputs(padding, key):
    attn, _ = _maps()
    assert _bits(attention_foreground(attn, TRAINING_MASS_FRACTION, blur_padding=padding)) == SAVED[key]


def test_unsupervised_protocol_reproduces_the_saved_outputs(tmp_path, monkeypatch):
    attn, _ = _maps()
    # The protocol's own path from head-averaged attention to masks, with the published options of
    # conf/eval/unsup_seg.yaml; only the model run is replaced by the maps.
    monkeypatch.setattr(unsup, "attention_maps", lambda model, ds, size, **kw: attn.mean(dim=1))
    opts = typed_options(unsup.UnsupSegOptions, OmegaConf.load(ROOT / "conf" / "eval" / "unsup_seg.yaml"))
    ctx = SimpleNamespace(model=None, batch_size=2, num_workers=0, device="cpu", amp_dtype=None, progress=False,
                          out_dir=tmp_path)
    masks, _ = unsup._noisy_foreground(ctx, opts, {"train": [None] * 3})
    assert _bits(masks["train"]) == SAVED["unsupervised"]


def test_attention_monitor_reproduces_the_saved_jaccards():
    attn, labels = _maps()
    merged, best, fg = attention_jaccards(attn, labels, 255, 0.6)
    assert [float(x).hex() for x in merged] == SAVED["monitor_merged"]
    assert [float(x).hex() for x in best] == SAVED["monitor_best_head"]
    # The merged foreground is the training-mask computation at the same 60 %, upsampled 4x.
    assert torch.equal(fg[:, ::4, ::4], attention_foreground(attn, 0.6))


def test_training_and_held_out_loss_pass_the_same_mask_parameters(tmp_path, monkeypatch):
    calls, fractions = [], []

    def spy(where):
        def wrapped(attention, blur_padding):
            calls.append((where, blur_padding))
            return teacher_foreground(attention, blur_padding)
        return wrapped

    def fraction_spy(attention, fraction, **kw):
        fractions.append(fraction)
        return attention_foreground(attention, fraction, **kw)

    monkeypatch.setattr(neco.engine.trainer, "teacher_foreground", spy("training"))
    monkeypatch.setattr(neco.heldout, "teacher_foreground", spy("held-out"))
    monkeypatch.setattr(neco.loss.masks, "attention_foreground", fraction_spy)
    overrides = [
        "experiment=quickstart", "backbone.weights=random", "logger.progress=false", "data.batch_size=2",
        "data.synthetic_images=4", "data.synthetic_size=48", "data.global_size=32", "data.local_size=16",
        "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16", "optim.epochs=1", "max_steps=1",
        "monitor.name=quick", "monitor.image_size=32", "monitor.train_images=4", "monitor.val_images=4",
        "monitor.num_figures=0",
        "loss.mask=fg", "loss.mask_blur_padding=zeros", f"paths.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg, tmp_path / "run")
    assert {where for where, _ in calls} == {"training", "held-out"}
    assert {padding for _, padding in calls} == {"zeros"} and set(fractions) == {0.6}
