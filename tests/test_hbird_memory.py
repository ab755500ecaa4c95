"""Hummingbird memory: augmentation against torchvision, label counts, rarity sampling, quotas, construction."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from neco.data.crops import random_resized_crop_params
from neco.errors import ConfigError
from neco.eval.hummingbird.augment import memory_pairs
from neco.eval.hummingbird.memory import (
    EMPTY_PATCH_SCORE,
    MemoryPlan,
    build_memory,
    patch_label_counts,
    per_image_quota,
    rarity_scores,
    rarity_select,
)
from neco.eval.primitives.features import HUMMINGBIRD_STD, IMAGENET_MEAN
from neco.eval.primitives.knn import TorchIndex


def _reference_pipeline(img, mask, size, seed):
    """The evaluator's transform chain on the global generator (hbird/utils/transforms.py, image_transformations)."""
    torch.manual_seed(seed)
    jitter = T.Compose([
        T.RandomApply([T.ColorJitter(brightness=0.1)], p=0.5),
        T.RandomApply([T.ColorJitter(contrast=0.1)], p=0.5),
        T.RandomApply([T.ColorJitter(saturation=0.1)], p=0.5),
        T.RandomApply([T.ColorJitter(hue=0.1)], p=0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, HUMMINGBIRD_STD),
    ])
    x = jitter(img)
    y = T.ToTensor()(mask)
    i, j, h, w = T.RandomResizedCrop.get_params(x, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3))
    x = TF.resized_crop(x, i, j, h, w, [size, size], T.InterpolationMode.BILINEAR, antialias=True)
    y = TF.resized_crop(y, i, j, h, w, [size, size], T.InterpolationMode.NEAREST)
    return x, (y * 255).long()[0]


def test_augmentation_reproduces_the_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))
    mask_np = rng.integers(0, 6, (30, 44), dtype=np.uint8)
    mask_np[:3] = 255
    for seed in range(12):  # covers jitter ops on and off, accepted crops and the fallback
        ref_x, ref_m = _reference_pipeline(img, Image.fromarray(mask_np), 24, seed)
        pairs = memory_pairs([], 24, IMAGENET_MEAN, HUMMINGBIRD_STD, seed=0, epoch=0)
        x, m = pairs.augment(img, torch.from_numpy(mask_np.astype(np.int64)), torch.Generator().manual_seed(seed))
        assert torch.equal(x, ref_x), seed
        assert torch.equal(m, ref_m), seed


def test_crop_scale_above_one_is_rejected_then_falls_back_to_the_whole_image():
    # torchvision's rule: boxes larger than the image are redrawn (10 tries), then a central crop.
    for shape in [(40, 40), (20, 90), (90, 20)]:
        whole = 0
        for seed in range(100):
            torch.manual_seed(seed)
            ref = T.RandomResizedCrop.get_params(torch.zeros(1, *shape), [0.5, 2.0], [3 / 4, 4 / 3])
            got = random_resized_crop_params(*shape, (0.5, 2.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
            assert got == ref
            i, j, h, w = got
            assert 0 < h <= shape[0] and 0 < w <= shape[1]
            whole += (h, w) == shape
        if shape == (40, 40):
            assert 0 < whole < 100  # the fallback happens, but not always
    # A very wide image falls back to the centred crop of the extreme ratio, never to a padded box.
    wide = random_resized_crop_params(10, 100, (5.0, 5.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert wide == (0, 43, 10, 13)


def _brute_counts(masks, p, c, ignore, to_bg):
    b, h, w = masks.shape
    out = np.zeros((b, (h // p) * (w // p), c), dtype=np.int64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                v = int(masks[n, y, x])
                if to_bg and v == 255:
                    v = 0
                elif not to_bg and v == ignore:
                    continue
                out[n, (y // p) * (w // p) + x // p, v] += 1
    return out


@pytest.mark.parametrize("to_bg", [True, False])
def test_patch_label_counts_match_brute_force(to_bg):
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 5, (2, 12, 8), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.2] = 255
    got = patch_label_counts(masks, 4, 5, 255, to_bg)
    assert torch.equal(got, torch.from_numpy(_brute_counts(masks.numpy(), 4, 5, 255, to_bg)))
    if to_bg:
        assert (got.sum(-1) == 16).all()  # every pixel counted: histograms are mean of one-hot pixels


def test_ignore_to_background_changes_a_histogram_by_the_hand_computed_amount():
    patch = torch.tensor([[[1, 1], [255, 0]]])
    ref = patch_label_counts(patch, 2, 3, 255, True)[0, 0].float()
    drop = patch_label_counts(patch, 2, 3, 255, False)[0, 0].float()
    assert torch.equal(ref / ref.sum(), torch.tensor([0.5, 0.5, 0.0]))  # the 255 pixel became class 0
    assert torch.allclose(drop / drop.sum(), torch.tensor([1 / 3, 2 / 3, 0.0]))
    # ADE20K-style data (ignore 0, no 255): the reference keeps label 0 as a class, the option drops it.
    ade = torch.tensor([[[0, 2], [2, 2]]])
    assert patch_label_counts(ade, 2, 3, 0, True)[0, 0].tolist() == [1, 0, 3]
    assert patch_label_counts(ade, 2, 3, 0, False)[0, 0].tolist() == [0, 0, 3]


def test_rarity_scores_match_the_reference_loops():
    g = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 4, (3, 16, 16), generator=g)
    masks[0, :8, :8] = 255  # with ignore dropped, these patches are empty
    counts = patch_label_counts(masks, 4, 4, 255, False)
    noise = torch.rand(3, 16, generator=g)
    got = rarity_scores(counts, noise)
    for n in range(3):  # the evaluator's get_class_frequency / get_patch_scores, on class sets
        classes = [set(torch.nonzero(counts[n, i]).flatten().tolist()) for i in range(16)]
        freq = np.zeros(4)
        for cs in classes:
            for c in cs:
                freq[c] += 1
        for i, cs in enumerate(classes):
            want = EMPTY_PATCH_SCORE if not cs else sum(freq[c] for c in cs) * float(noise[n, i])
            assert got[n, i].item() == pytest.approx(want, rel=1e-6)


def test_rarity_sampler_keeps_k_per_image_and_always_the_rare_patches():
    # 8x8 patches of class 0, one patch of class 2 and one mixed (0, 3): 3 is as rare as 2, but mixed.
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, 8:16, 8:16] = 2
    mask[0, 40:48, 40:44] = 3
    counts = patch_label_counts(mask, 8, 4, 255, True)
    rare = {1 * 8 + 1}
    for seed in range(300):
        noise = torch.rand(1, 64, generator=torch.Generator().manual_seed(seed))
        keep = rarity_select(counts, 6, noise)
        assert keep.shape == (1, 6) and len(set(keep[0].tolist())) == 6
        assert rare <= set(keep[0].tolist())  # score <= 1 vs >= 63 * u for a plain background patch


def test_per_image_quota_and_its_errors():
    assert per_image_quota(10_240_000, 10_582, 2, 36 * 36, False) == 483  # VOC trainaug, 2 epochs
    assert per_image_quota(None, 80, 2, 1296, False) == 1296
    with pytest.raises(ConfigError, match="eval.hummingbird.memory_size=10240000 asks for 64000"):
        per_image_quota(10_240_000, 80, 2, 1296, False)  # VOC 1/128 with the full-data memory
    assert per_image_quota(10_240_000, 80, 2, 1296, True) == 1296
    with pytest.raises(ConfigError, match="smaller than the number"):
        per_image_quota(100, 80, 2, 1296, False)
    plan = MemoryPlan.make(10_240_000, 10_582, 2, 36)
    assert plan.rows == 10_222_212 and plan.zero_rows(10_240_000, True) == 17_788
    assert plan.zero_rows(10_240_000, False) == 0
    assert MemoryPlan.make(10_240_000, 80, 2, 36, clamp=True).zero_rows(10_240_000, True) == 0


class _PatchMeans(torch.nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, 3) patch means: a deterministic stand-in for a ViT."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, self.p).permute(0, 2, 3, 1) + 1.0


class _Pairs:
    def __init__(self, n, size, seed=0):
        rng = np.random.default_rng(seed)
        self.items = [(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                       torch.from_numpy(rng.integers(0, 3, (size, size)))) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _build(dataset, plan, **kw):
    index = TorchIndex(plan.rows, 3, torch.device("cpu"), torch.float32)
    args = dict(image_size=16, patch_size=4, num_classes=3, ignore_index=255, mean=IMAGENET_MEAN,
                std=HUMMINGBIRD_STD, seed=0, device=torch.device("cpu"), batch_size=3)
    labels = build_memory(_PatchMeans(4), dataset, index, plan, **(args | kw))
    return index, labels


def test_build_memory_fills_every_row_k_per_image():
    data = _Pairs(5, 20)
    plan = MemoryPlan.make(5 * 2 * 7, 5, 2, 4)  # k = 7 of 16 patches per augmented image
    index, labels = _build(data, plan)
    assert plan.per_image == 7 and index.size == labels.shape[0] == 70
    assert labels.dtype == torch.uint8 and (labels.sum(1) == 16).all()
    assert torch.allclose(index.data.norm(dim=1), torch.ones(70))  # L2-normalised rows
    again, labels2 = _build(data, plan, batch_size=2)  # the batch size does not change the memory
    assert torch.equal(labels, labels2) and torch.allclose(index.data, again.data)


def test_unbounded_identity_crop_stores_each_image_in_order():
    data = _Pairs(3, 16, seed=1)
    plan = MemoryPlan.make(None, 3, 1, 4)
    index, labels = _build(data, plan, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0)
    masks = torch.stack([m for _, m in data.items])
    assert torch.equal(labels.long(), patch_label_counts(masks, 4, 3, 255).reshape(-1, 3))
