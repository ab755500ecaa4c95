"""Linear segmentation protocol (METHOD.md §6.4): augmentation, head, metric quirks, bookkeeping, end to end."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from eval_helpers import make_context, synthetic_splits
from omegaconf import OmegaConf
from PIL import Image

from neco.data.crops import random_resized_crop_params
from neco.errors import ConfigError
from neco.eval.context import typed_options
from neco.eval.linear.data import train_subset, training_pairs
from neco.eval.linear.head import TopK, head_logits, linear_miou, load_head, make_head, masked_cross_entropy
from neco.eval.linear.protocol import LinearOptions, evaluate_head, reference_loader_settings, run
from neco.eval.primitives.batches import evaluated_count
from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval" / "linear.yaml"
PATCH, GRID = 8, 4
SIZE = PATCH * GRID
PALETTE = np.array([[230, 25, 25], [25, 210, 40], [40, 60, 235], [240, 230, 30]], dtype=np.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class StripeScenes:
    """Patch-wide vertical stripes, each a random class, coloured by class (``PALETTE``); dataset contract."""

    def __init__(self, n, seed, split="train", ignore_index=255, num_classes=4):
        g = torch.Generator().manual_seed(seed)
        low = 1 if ignore_index == 0 else 0  # with ignore 0 every pixel has a real class
        cols = torch.randint(low, num_classes, (n, GRID), generator=g)
        self.masks = cols.repeat_interleave(PATCH, dim=1)[:, None, :].expand(n, SIZE, SIZE).clone()
        self.name, self.split = "stripes", split
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __len__(self):
        return len(self.masks)

    def image_id(self, i):
        return f"img{i:04d}"

    def __getitem__(self, i):
        return Image.fromarray(PALETTE[self.masks[i].numpy() % len(PALETTE)]), self.masks[i]


class ClassEncoder(nn.Module):
    """Normalised images -> one-hot of the palette colour nearest to each patch's mean colour, (B, h, w, C)."""

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
        self.register_buffer("palette", (torch.tensor(PALETTE, dtype=torch.float32) - mean) / std)

    def forward(self, x):
        cells = F.avg_pool2d(x, PATCH).permute(0, 2, 3, 1)  # (B, h, w, 3)
        nearest = torch.cdist(cells.reshape(-1, 3), self.palette).argmin(dim=1)
        return F.one_hot(nearest, len(PALETTE)).float().reshape(*cells.shape[:3], -1)


class RandomFeatures(nn.Module):
    """Features that say nothing about the image: fresh Gaussian noise, (B, h, w, 16)."""

    def forward(self, x):
        return torch.randn(x.shape[0], x.shape[2] // PATCH, x.shape[3] // PATCH, 16)


def stripes_splits(train=32, val=16, ignore_index=255):
    return lambda split: StripeScenes(train if split == "train" else val, 1 if split == "train" else 2, split,
                                      ignore_index)


# A CPU-sized protocol: 32-px images (4x4 tokens), scored at token resolution, a few epochs.
SMALL = dict(image_size=SIZE, mask_size=GRID, epochs=4, lr_step=3, batch_size=8, val_batch_size=8)


# --- augmentation and data -------------------------------------------------------------------------------

def test_crop_params_full_image_and_fallback():
    rng = np.random.default_rng(0)
    assert random_resized_crop_params(40, 40, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 40, 40)
    # No crop of ratio in [2, 3] fits a square: the central fallback, width 40, height round(40 / 2) = 20.
    assert random_resized_crop_params(40, 40, (1.0, 1.0), (2.0, 3.0), rng) == (10, 0, 20, 40)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(30, 50, (0.8, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert 0.8 * 1500 - 60 <= h * w <= 1500  # area fraction in [0.8, 1] up to the rounding of w and h


def test_augmentation_is_joint_deterministic_and_flips_both():
    data = StripeScenes(4, 0)
    data.masks[:] = torch.arange(4).repeat_interleave(PATCH)  # every class in every image
    make = lambda flip: training_pairs(data, range(4), 24, None, hflip=flip, seed=3)  # noqa: E731
    x0, m0 = make(0.0)[1]
    x1, m1 = make(1.0)[1]
    assert x0.shape == (3, 24, 24) and x0.dtype == torch.uint8 and m0.shape == (24, 24)
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(m1, m0.flip(-1))  # same crop, both flipped
    assert torch.equal(make(0.5)[2][0], make(0.5)[2][0])  # a pure function of (seed, epoch, index)
    again = make(0.0)
    again.set_epoch(1)
    assert not torch.equal(again[1][0], x0)
    # The mask follows the image: away from stripe edges the pixel colour is its class's palette colour.
    colour_class = torch.cdist(x0.permute(1, 2, 0).reshape(-1, 3).float(), torch.tensor(PALETTE).float()).argmin(1)
    assert (colour_class == m0.reshape(-1).long()).float().mean() > 0.85
    # Masks then go nearest to the scoring size, like the val masks.
    assert training_pairs(data, range(4), 24, 6)[0][1].shape == (6, 6)


def test_train_subset_and_evaluated_counts(tmp_path):
    data = StripeScenes(118, 0)
    ids = train_subset(data, 0.1, seed=5, out_file=tmp_path / "ids.txt")
    assert len(ids) == 11 and ids == sorted(set(ids))  # int(118 * 0.1), as the reference
    assert (tmp_path / "ids.txt").read_text().split() == [f"img{i:04d}" for i in ids]
    assert train_subset(data, 0.1, seed=5) == ids and train_subset(data, 0.1, seed=6) != ids
    assert train_subset(data, 1.0, seed=5) == list(range(118))
    # VOC val at batch 128 (METHOD.md §10.13).
    assert evaluated_count(1449, 128, drop_last=True) == 1408
    assert evaluated_count(1449, 128, drop_last=False) == 1449


# --- head and metric -------------------------------------------------------------------------------------

def test_conv_then_upsample_equals_reference_order():
    head = make_head(6, 3, seed=0)
    tokens = torch.randn(2, 4, 5, 6)
    ours = head_logits(head, tokens, 20)
    # The reference: features upsampled bilinearly first, then the 1x1 convolution.
    up = F.interpolate(tokens.permute(0, 3, 1, 2), size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, head(up), atol=1e-5, rtol=1e-5)
    assert torch.equal(make_head(6, 3, seed=0).weight, head.weight)  # seeded init


def test_cross_entropy_ignores_and_survives_empty_batches():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 255], [2, 255]]])
    expected = -(logits.log_softmax(1)[0, 0, 0, 0] + logits.log_softmax(1)[0, 2, 1, 0]) / 2
    torch.testing.assert_close(masked_cross_entropy(logits, target, 255), expected)
    assert masked_cross_entropy(logits, torch.full_like(target, 255), 255).item() == 0.0


def test_ignored_class_counted_in_miou_by_hand():
    # ADE20K-like: class 0 is the ignore label, its row is empty; 2 pixels were predicted as 0.
    conf = torch.tensor([[0, 0, 0, 0], [1, 8, 2, 0], [0, 0, 6, 0], [1, 1, 0, 3]])
    ious = [0.0, 8 / 12, 6 / 8, 3 / 5]  # TP / (TP + FP + FN)
    iou, miou_all, acc = linear_miou(conf, ignore_index=0, count_ignore_class=True)
    _, miou_rest, _ = linear_miou(conf, ignore_index=0, count_ignore_class=False)
    torch.testing.assert_close(iou, torch.tensor(ious, dtype=torch.float64))
    assert miou_all == pytest.approx(100 * sum(ious) / 4)
    assert miou_rest == pytest.approx(100 * sum(ious) / 3) == pytest.approx(miou_all * 4 / 3)
    assert acc == pytest.approx(100 * 17 / 22)
    # An ignore label that is no class id (255) changes nothing.
    assert linear_miou(conf, 255, False)[1] == linear_miou(conf, 255, True)[1]


def test_top3_bookkeeping(tmp_path):
    top = TopK(3, tmp_path)
    mious = [10, 30, 20, 25, 40, 5, 30, 30]
    kept = [top.offer(e, m, {"state_dict": {}, "epoch": e}) for e, m in enumerate(mious)]
    # 25 evicts 10, 40 evicts 20, epoch 6's 30 beats 25; epoch 7's 30 only ties the worst kept one.
    assert kept == [True, True, True, True, True, False, True, False]
    assert [(e["epoch"], e["miou"]) for e in top.kept] == [(4, 40), (1, 30), (6, 30)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(e["path"]).name for e in top.kept)
    assert top.best["epoch"] == 4


# --- the protocol ----------------------------------------------------------------------------------------

def test_class_encoding_features_reach_100(tmp_path):
    ctx = make_context(tmp_path, model=ClassEncoder(), get_dataset=stripes_splits(), dataset_name="stripes")
    res = run(ctx, dict(SMALL, lr=1.0))
    assert res.metrics["miou"] == pytest.approx(100.0) and res.metrics["pixel_acc"] == pytest.approx(100.0)
    assert res.options["augment"] is True and res.extra["num_val_images"] == 16
    # StepLR: x0.1 from epoch 3 on; drop_last: 32 images at batch 8 = 4 steps per epoch.
    hist = res.extra["history"]
    assert [h["lr"] for h in hist] == pytest.approx([1.0, 1.0, 1.0, 0.1])
    assert all(h["steps"] == 4 for h in hist)
    assert len(res.extra["kept_heads"]) == 3 and len(list((ctx.out_dir / "heads").iterdir())) == 3


def test_random_features_near_chance(tmp_path):
    ctx = make_context(tmp_path, model=RandomFeatures(), get_dataset=stripes_splits(64, 32), cache=False,
                       dataset_name="stripes")
    res = run(ctx, dict(SMALL, augment=False, epochs=6, lr=0.1, train_fraction=0.5))
    # 4 balanced classes: a random labelling scores 1/7 = 14 %, one constant class 6 %.
    assert res.metrics["miou"] < 30.0
    # The drawn half of the train split, by image id, next to the result.
    assert res.extra["num_train_images"] == 32 and len(Path(res.extra["train_ids"]).read_text().split()) == 32


def test_published_schedule_drop_last_and_reevaluation(tmp_path):
    """25 epochs, lr 0.01 -> 0.001 at epoch 20; drop_last on both loaders; saved heads reproduce their mIoU."""
    ctx = make_context(tmp_path, model=ClassEncoder(), get_dataset=stripes_splits(20, 20, ignore_index=0),
                       dataset_name="stripes")
    opts = dict(image_size=SIZE, mask_size=GRID, batch_size=8, val_batch_size=8, augment=False,
                drop_last_val=True)
    res = run(ctx, opts)
    assert res.options["drop_last_val_resolved"] is True and res.options["shuffle_resolved"] is True
    hist = res.extra["history"]
    assert len(hist) == 25 and [h["lr"] for h in hist] == pytest.approx([0.01] * 20 + [0.001] * 5)
    assert all(h["steps"] == 2 for h in hist)  # 20 train images, batch 8, last partial batch dropped
    assert res.extra["num_val_images"] == 16
    assert res.metrics["miou"] == max(h["miou"] for h in hist) and res.metrics["miou_last"] == hist[-1]["miou"]
    for kept in res.extra["kept_heads"]:
        again = evaluate_head(ctx, kept["path"], GRID, drop_last_val=True, val_batch_size=8)
        assert again["miou"] == pytest.approx(kept["miou"], abs=1e-9) and again["num_images"] == 16
    best = res.extra["kept_heads"][0]["path"]
    assert evaluate_head(ctx, best, GRID)["num_images"] == 20  # eval_linear.py scores the whole split
    # Ignore label 0 is class 0 of 4: counting it averages in a zero, i.e. x3/4 of the mean over the others.
    counted = evaluate_head(ctx, best, GRID, miou_classes="all")["miou"]
    left_out = evaluate_head(ctx, best, GRID, miou_classes="exclude_ignore")["miou"]
    assert counted == pytest.approx(left_out * 3 / 4)
    # Head-only mode: no training, the head scored at eval_mask_size (full input size when null).
    only = run(ctx, {"head": best, "eval_mask_size": None})
    assert "history" not in only.extra and only.extra["mask_size"] == SIZE and only.options["head"] == best
    assert load_head(best)[1]["image_size"] == SIZE


def test_options_yaml_and_errors(tmp_path):
    cfg = OmegaConf.load(CONF)
    assert typed_options(LinearOptions, cfg) == LinearOptions()  # the yaml lists the published defaults
    assert reference_loader_settings(typed_options(LinearOptions, cfg, "voc"), "voc") == (True, True)
    assert reference_loader_settings(typed_options(LinearOptions, cfg, "ade20k"), "ade20k") == (False, False)
    assert reference_loader_settings(LinearOptions(shuffle=True, drop_last_val=False), "voc") == (True, False)
    assert typed_options(LinearOptions, cfg, "coco_stuff").train_fraction == 0.1
    assert typed_options(LinearOptions, cfg, "coco_things").train_fraction == 0.1
    ctx = make_context(tmp_path, model=ClassEncoder(), get_dataset=stripes_splits(), dataset_name="stripes")
    with pytest.raises(ConfigError, match="eval.linear.epoch"):
        run(ctx, {"epoch": 3})
    with pytest.raises(ConfigError, match="eval.linear.drop_last_val"):
        run(ctx, dict(SMALL, drop_last_val=True, val_batch_size=64))
    with pytest.raises(ConfigError, match="eval.linear.miou_classes"):
        run(ctx, {"miou_classes": "150"})
    with pytest.raises(ConfigError, match="eval.linear.head"):
        run(ctx, {"head": str(tmp_path / "missing.pt")})


def test_end_to_end_synthetic(tmp_path):
    start = time.perf_counter()
    ctx = make_context(tmp_path, get_dataset=synthetic_splits(16, 8, 48), num_figures=2)
    res = run(ctx, OmegaConf.load(CONF))
    elapsed = time.perf_counter() - start
    assert set(res.metrics) == {"miou", "miou_last", "pixel_acc"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in res.metrics.values())
    assert res.options["image_size"] == 96 and res.options["epochs"] == 4 and res.options["mask_size"] == 96
    assert len(res.extra["per_class_iou"]) == 7 and len(res.extra["history"]) == 4
    assert res.figures and all(Path(f).is_file() for f in res.figures)
    assert elapsed < 60
