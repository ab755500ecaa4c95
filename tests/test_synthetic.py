import time

import numpy as np
import pytest
import torch
from PIL import Image

from neco.data.synthetic import SyntheticScenes, SyntheticTrain


@pytest.fixture(scope="module")
def scenes():
    data = SyntheticScenes(split="train", num_images=96, image_size=96, seed=0)
    return data, [data[i] for i in range(len(data))]


def test_items_are_rgb_images_with_long_masks(scenes):
    data, items = scenes
    image, mask = items[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (96, 96)
    assert mask.dtype == torch.int64 and mask.shape == (96, 96)
    assert data.num_classes == len(data.class_names) and data.class_names[0] == "background"
    assert data.ignore_index == 255
    for _, m in items:
        assert int(m.min()) >= 0 and int(m.max()) < data.num_classes


def test_same_index_gives_the_same_scene_in_any_order():
    a = SyntheticScenes(num_images=10, image_size=64, seed=3)
    b = SyntheticScenes(num_images=10, image_size=64, seed=3)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for (ia, ma), (ib, mb) in zip(forward, backward, strict=True):
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and torch.equal(ma, mb)
    assert np.array_equal(np.asarray(a[-1][0]), np.asarray(a[9][0]))
    with pytest.raises(IndexError):
        a[10]


def test_seeds_and_splits_give_different_scenes():
    base = np.asarray(SyntheticScenes(image_size=64, seed=0)[0][0])
    assert not np.array_equal(base, np.asarray(SyntheticScenes(image_size=64, seed=1)[0][0]))
    assert not np.array_equal(base, np.asarray(SyntheticScenes("val", image_size=64, seed=0)[0][0]))
    assert not np.array_equal(base, np.asarray(SyntheticScenes(image_size=64, seed=0)[1][0]))
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("validation")


def test_every_class_appears(scenes):
    data, items = scenes
    counts = np.bincount(torch.stack([m for _, m in items]).flatten().numpy(), minlength=data.num_classes)
    assert (counts > 0).all(), counts
    # Background dominates but objects cover a real share of the pixels.
    assert 0.5 < counts[0] / counts.sum() < 0.95


def test_colour_does_not_give_the_class_away(scenes):
    """Per-object mean colours of every class spread over the same range; class means nearly coincide
    (within ~3 standard errors of ~30 objects per class)."""
    data, items = scenes
    per_class = {c: [] for c in range(data.num_classes)}
    for image, mask in items:
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        flat = mask.flatten().numpy()
        for c in np.unique(flat):
            per_class[int(c)].append(pixels[flat == c].mean(axis=0))
    means = {c: np.mean(v, axis=0) for c, v in per_class.items() if len(v) >= 5}
    assert len(means) == data.num_classes
    centre = np.mean(list(means.values()), axis=0)
    for c, m in means.items():
        assert np.abs(m - centre).max() < 40, (data.class_names[c], m, centre)
    for c in range(1, data.num_classes):
        spread = np.std(per_class[c], axis=0)
        assert (spread > 25).all(), (data.class_names[c], spread)


def test_training_view_applies_the_transform():
    train = SyntheticTrain(lambda im: np.asarray(im).shape, num_images=5, image_size=40)
    assert len(train) == 5 and train[2] == (40, 40, 3)
    assert isinstance(SyntheticTrain(num_images=2)[0], Image.Image)


def test_generation_is_fast():
    data = SyntheticScenes(num_images=512, image_size=128, seed=11)
    start = time.perf_counter()
    for i in range(len(data)):
        data[i]
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"512 synthetic images took {elapsed:.2f} s"
