"""Every figure writer produces a readable PNG with a sensible shape."""

import json

import numpy as np
import torch
from PIL import Image

from neco.viz import (
    colorize_labels,
    denormalize,
    label_palette,
    plot_metrics,
    save_crops_figure,
    save_feature_pca_figure,
    save_segmentation_figure,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size  # (width, height)


def _normalised(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) - MEAN) / STD


def test_denormalize_roundtrip():
    img = torch.rand(3, 5, 7)
    out = denormalize((img - MEAN) / STD)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, (img.permute(1, 2, 0).numpy() * 255).round(), atol=1)


def test_palette_and_colorize():
    pal = label_palette(40)
    assert pal.shape == (40, 3) and len({tuple(c) for c in pal}) == 40
    assert not (pal == 0).all(axis=1).any()  # black is reserved for ignore
    rgb = colorize_labels(torch.tensor([[0, 1], [255, 3]]), num_classes=3)
    assert (rgb[1, 0] == 0).all() and tuple(rgb[0, 0]) == tuple(pal[0])
    assert tuple(rgb[1, 1]) == (128, 128, 128)  # out of range, not ignore


def test_crops_figure(tmp_path):
    sizes = [64, 64, 28, 28, 28, 28]
    crops = [_normalised(1, s, seed=i)[0] for i, s in enumerate(sizes)]
    n = len(sizes)
    gc = torch.zeros(2, n, 4)
    all_ = torch.zeros(n, 2, 4)
    for g in range(2):
        for j in range(n):
            gc[g, j] = torch.tensor([10.0, 12.0, 40.0, 50.0])
            all_[j, g] = torch.tensor([0.0, 2.0, sizes[j] * 0.7, sizes[j]])
        gc[g, g] = torch.tensor([0.0, 0.0, 64.0, 64.0])
    path = save_crops_figure(crops, {"gc": gc, "all": all_}, tmp_path / "crops.png", title="sample 0")
    w, h = _png_size(path)
    assert w > h  # crops laid out side by side


def test_segmentation_figure(tmp_path):
    images = _normalised(3, 32)
    masks = torch.randint(0, 5, (3, 32, 32))
    masks[:, :4] = 255
    preds = {"nn": torch.randint(0, 5, (3, 32, 32)), "kmeans": torch.randint(0, 5, (3, 32, 32))}
    w1, h1 = _png_size(save_segmentation_figure(images, masks, preds, tmp_path / "a.png", num_classes=5))
    w2, h2 = _png_size(
        save_segmentation_figure(images[:1], masks[:1], {"nn": preds["nn"][:1]}, tmp_path / "b.png", 5)
    )
    assert w1 > w2 and h1 > h2  # more prediction columns -> wider, more images -> taller
    assert w1 > h1 * 0.9  # 4 columns x 3 rows


def test_feature_pca_figure(tmp_path):
    images = _normalised(3, 32)
    feats = torch.randn(3, 4, 4, 24)
    w3, h3 = _png_size(save_feature_pca_figure(images, feats, tmp_path / "pca3.png"))
    w1, h1 = _png_size(save_feature_pca_figure(images[:1], feats[:1], tmp_path / "pca1.png"))
    assert h3 > h1 and w3 == w1
    # Fewer feature dimensions than RGB channels still renders.
    _png_size(save_feature_pca_figure(images[:2], torch.randn(2, 4, 4, 2), tmp_path / "pca_lowdim.png"))


def test_plot_metrics(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 5.0 / (s + 1), "lr": 1e-4 * min(1, s / 10)}) for s in range(50)]
    lines.insert(10, json.dumps({"step": 9, "val/miou": 0.3}))  # records without the key are skipped
    log.write_text("\n".join(lines) + '\n{"step": 51, "loss"')  # truncated last line tolerated
    w1, h1 = _png_size(plot_metrics(log, tmp_path / "loss.png"))
    w2, h2 = _png_size(plot_metrics(log, tmp_path / "loss2.png", keys=("loss", "val/miou", "missing")))
    assert h2 > h1 and w1 == w2


def test_segmentation_legend_lists_the_classes_that_appear():
    from neco.viz import classes_shown

    mask = torch.tensor([[0, 3], [255, 3]])
    pred = torch.tensor([[7, 1], [1, 99]])  # 99: out of range, drawn grey, not a class
    assert classes_shown([mask, pred], num_classes=10) == ([0, 1, 3, 7], True)
    assert classes_shown([pred], num_classes=10) == ([1, 7], False)
    assert classes_shown([mask, pred], num_classes=10, limit=2) == ([0, 1], True)


def test_loss_smoothing_follows_the_trend():
    from neco.viz import smooth

    assert all(abs(v - 2.0) < 1e-12 for v in smooth([2.0, 2.0, 2.0]))  # bias-corrected: no ramp from zero
    out = smooth([10.0, 0.0, 0.0, 0.0], weight=0.5)
    assert out[0] == 10.0 and out[1] < 10.0 and out[-1] < out[1] and out[-1] > 0.0
