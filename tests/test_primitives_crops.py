"""The one crop rule (neco.data.crops) and the one augmented-pairs dataset (neco.eval.primitives.pairs).

Each user's parameters must reproduce the crops and pairs it produced before the three copies became one: the
torch variants against torchvision itself, the numpy variant and the linear pairs against digests of 1,000 crops
and 25 pairs saved from the former code on fixed seeds.
"""

import hashlib

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from neco.data.crops import CROP_ATTEMPTS, random_resized_crop_params
from neco.eval.hummingbird.augment import memory_pairs
from neco.eval.linear.data import training_pairs
from neco.eval.primitives.features import HUMMINGBIRD_STD, IMAGENET_MEAN, IMAGENET_STD
from neco.eval.primitives.pairs import AugmentedPairs, item_generator

SHAPES = [(40, 40), (30, 50), (50, 30), (20, 90), (90, 20), (500, 375), (375, 500), (3, 7), (1, 1), (2, 5), (480, 640)]
SCALES = [(0.25, 1.0), (0.05, 0.25), (0.5, 2.0), (0.8, 1.0), (1.0, 1.0), (5.0, 5.0)]
RATIOS = [(3 / 4, 4 / 3), (1.0, 1.0), (2.0, 3.0)]
CASES = [(shape, scale, ratio) for shape in SHAPES for scale in SCALES for ratio in RATIOS]


def thousand_crops(rng):
    """1,000 consecutive draws over every (shape, scale, ratio) case, tiny and fallback-only ones included."""
    out = []
    for k in range(1000):
        (h, w), scale, ratio = CASES[k % len(CASES)]
        out.append(random_resized_crop_params(h, w, scale, ratio, rng))
    return out


def digest(crops) -> str:
    return hashlib.sha256(str([tuple(int(v) for v in c) for c in crops]).encode()).hexdigest()[:16]


# --- the crop rule ------------------------------------------------------------------------------------------

def test_torch_variants_are_torchvisions_get_params_draw_for_draw():
    # Multi-crop (global generator) and Hummingbird (own generator): torchvision's crops, and the generator left
    # in the same state, since the photometric draws that follow share the stream.
    for seed in range(3):
        torch.manual_seed(seed)
        ref = [T.RandomResizedCrop.get_params(torch.empty(0, h, w), list(s), list(r)) for (h, w), s, r in CASES]
        ref_next = torch.rand(1)
        torch.manual_seed(seed)
        assert [random_resized_crop_params(h, w, s, r) for (h, w), s, r in CASES] == ref
        assert torch.equal(torch.rand(1), ref_next)
        g = torch.Generator().manual_seed(seed)
        assert [random_resized_crop_params(h, w, s, r, g) for (h, w), s, r in CASES] == ref
        assert torch.equal(torch.rand(1, generator=g), ref_next)


def test_each_user_reproduces_its_saved_crops():
    # Digests of the same 1,000 draws made with the former copies: multi-crop's torchvision call on
    # torch.manual_seed(1234), Hummingbird's crop_params on one Generator(99), linear's numpy sampler on
    # default_rng(7).
    torch.manual_seed(1234)
    assert digest(thousand_crops(None)) == "cfb3f599a92f8d15"
    assert digest(thousand_crops(torch.Generator().manual_seed(99))) == "031130f9516a1de0"
    linear = thousand_crops(np.random.default_rng(7))
    assert linear[:3] == [(6, 2, 30, 38), (4, 13, 26, 26), (3, 5, 12, 34)]
    assert digest(linear) == "94afad101787e41c"


def test_torch_and_numpy_sources_give_different_crops_on_the_same_seed():
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    torch_crops = [random_resized_crop_params(30, 50, (0.3, 1.0), (3 / 4, 4 / 3), g) for _ in range(3)]
    numpy_crops = [random_resized_crop_params(30, 50, (0.3, 1.0), (3 / 4, 4 / 3), rng) for _ in range(3)]
    assert torch_crops == [(1, 16, 29, 34), (3, 11, 27, 29), (1, 1, 29, 32)]
    assert numpy_crops == [(0, 26, 26, 19), (6, 0, 19, 24), (1, 0, 28, 27)]
    # The global generator and an explicit one seeded alike are the same stream.
    torch.manual_seed(0)
    assert [random_resized_crop_params(30, 50, (0.3, 1.0), (3 / 4, 4 / 3)) for _ in range(3)] == torch_crops


@pytest.mark.parametrize("make_rng", [lambda: torch.Generator().manual_seed(0), lambda: np.random.default_rng(0)])
def test_fallback_is_the_central_crop_clamped_to_the_ratio(make_rng):
    # Area scale 5: no box fits, so every source falls back to the same central crop after its ten tries.
    cases = {
        (10, 100): (0, 43, 10, 13),  # too wide: full height, width round(10 * 4/3)
        (100, 10): (43, 0, 13, 10),  # too tall: full width, height round(10 / (3/4))
        (30, 36): (0, 0, 30, 36),  # ratio 1.2 within [3/4, 4/3]: the whole image
        (3, 7): (0, 1, 3, 4),  # odd sizes: offsets floor((7 - 4) / 2)
    }
    for (h, w), want in cases.items():
        assert random_resized_crop_params(h, w, (5.0, 5.0), (3 / 4, 4 / 3), make_rng()) == want
    # torchvision's rounding, kept: a 1-pixel-wide image whose ratio range starts at 2 gets a zero height.
    assert random_resized_crop_params(1, 1, (5.0, 5.0), (2.0, 3.0), make_rng()) == (0, 0, 0, 1)


def test_fallback_consumes_exactly_the_ten_tries():
    g = torch.Generator().manual_seed(4)
    random_resized_crop_params(10, 100, (5.0, 5.0), (3 / 4, 4 / 3), g)
    replay = torch.Generator().manual_seed(4)
    for _ in range(2 * CROP_ATTEMPTS):  # an area fraction and a log-ratio per try
        torch.empty(1).uniform_(0, 1, generator=replay)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=replay))
    torch.manual_seed(4)
    assert random_resized_crop_params(1, 1, (5.0, 5.0), (2.0, 3.0)) == T.RandomResizedCrop.get_params(
        torch.empty(0, 1, 1), [5.0, 5.0], [2.0, 3.0])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty image"):
        random_resized_crop_params(0, 5, (0.5, 1.0), (3 / 4, 4 / 3))
    with pytest.raises(TypeError, match="rng must be"):
        random_resized_crop_params(5, 5, (0.5, 1.0), (3 / 4, 4 / 3), 7)


# --- augmented pairs ------------------------------------------------------------------------------------------

class Fake(torch.utils.data.Dataset):
    """Random images and label maps of odd sizes (the same as the saved pairs were made from)."""

    def __init__(self):
        r = np.random.default_rng(0)
        self.items = []
        for h, w in [(30, 44), (41, 29), (17, 17), (64, 48), (7, 300)]:
            img = Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8))
            m = r.integers(0, 21, (h, w)).astype(np.int64)
            m[:2] = 255
            self.items.append((img, torch.from_numpy(m)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_linear_parameters_reproduce_the_saved_pairs():
    data, h = Fake(), hashlib.sha256()
    for seed, epoch, size, mask_size, kw in [(0, 0, 24, None, {}), (0, 1, 24, 6, {}),
                                             (5, 3, 32, 8, {"label_resize": "centre"}),
                                             (2, 0, 16, 4, {"hflip": 1.0, "scale": (0.3, 1.0)}),
                                             (2, 0, 16, 16, {"hflip": 0.0})]:
        pairs = training_pairs(data, [4, 0, 2, 1, 3], size, mask_size, seed=seed, **kw)
        pairs.set_epoch(epoch)
        for x, m in pairs:
            assert x.dtype == m.dtype == torch.uint8 and x.shape == (3, size, size)
            h.update(x.numpy().tobytes())
            h.update(m.numpy().tobytes())
    assert h.hexdigest()[:16] == "440bf8153fd85609"


def _torchvision_memory_pair(img, mask, size, seed):
    """Hummingbird's reference chain on the global generator (hbird/utils/transforms.py)."""
    torch.manual_seed(seed)
    ops = [T.RandomApply([T.ColorJitter(**{op: 0.1})], p=0.5) for op in ("brightness", "contrast", "saturation", "hue")]
    x = T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_MEAN, HUMMINGBIRD_STD)])(img)
    i, j, h, w = T.RandomResizedCrop.get_params(x, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3))
    x = TF.resized_crop(x, i, j, h, w, [size, size], T.InterpolationMode.BILINEAR, antialias=True)
    y = TF.resized_crop(mask[None].float(), i, j, h, w, [size, size], T.InterpolationMode.NEAREST)
    return x, y[0].long()


def test_hummingbird_parameters_replay_torchvision_per_item():
    # Item i of epoch e draws from item_generator(seed, e, i), whose seed is pinned: the memory's stream.
    assert item_generator(0, 0, 0).initial_seed() == 7896617691693857887
    assert item_generator(3, 2, 4).initial_seed() == 2653433342817477849
    data = Fake()
    for seed, epoch in [(0, 0), (3, 2)]:
        pairs = memory_pairs(data, 24, IMAGENET_MEAN, HUMMINGBIRD_STD, seed, epoch)
        for index in range(len(data)):
            x, m = pairs[index]
            ref_x, ref_m = _torchvision_memory_pair(*data[index], 24, item_generator(seed, epoch, index).initial_seed())
            assert x.dtype == torch.float32 and m.dtype == torch.int64
            assert torch.equal(x, ref_x) and torch.equal(m, ref_m), (seed, epoch, index)


GRID4 = torch.arange(16).view(4, 4)  # label = 4 * row + col


def full_crop_pairs(**kw):
    """Whole-image crops (scale and ratio 1) of ``GRID4`` to 3x3: only the resampler decides the pixels."""
    img = Image.fromarray(np.full((4, 4, 3), 128, np.uint8))
    opts = dict(random_source="numpy", resample="pil", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    return AugmentedPairs([(img, GRID4)], 3, **{**opts, **kw})


def test_resamplers_read_different_source_pixels():
    # torch's nearest reads floor(k * 4/3) = 0, 1, 2; PIL's the pixel centre, floor((k + 0.5) * 4/3) = 0, 2, 3.
    _, pil = full_crop_pairs()[0]
    _, tensor = full_crop_pairs(resample="tensor", mean=IMAGENET_MEAN, std=IMAGENET_STD)[0]
    assert pil.dtype == torch.uint8 and tensor.dtype == torch.int64
    assert pil.tolist() == [[0, 2, 3], [8, 10, 11], [12, 14, 15]]
    assert tensor.tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]


def test_flip_and_mask_shrink_follow_the_options():
    _, flipped = full_crop_pairs(hflip=1.0)[0]
    assert flipped.tolist() == [[3, 2, 0], [11, 10, 8], [15, 14, 12]]
    # The shrink comes after the flip: 3 -> 2 by torch's nearest keeps source columns 0 and 1 of the flipped map.
    _, shrunk = full_crop_pairs(hflip=1.0, mask_size=2)[0]
    assert shrunk.tolist() == [[3, 2], [11, 10]]
    # hflip 0 and no jitter draw nothing: the torch source then gives the crop alone.
    x, _ = full_crop_pairs(random_source="torch")[0]
    assert x.shape == (3, 3, 3) and x.dtype == torch.uint8


def test_bad_pairs_and_options_are_refused():
    img = Image.fromarray(np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"item 0: mask \(4, 4\) and image \(4, 5\) differ in size"):
        AugmentedPairs([(img, GRID4)], 3, random_source="numpy", resample="pil", scale=(1.0, 1.0))[0]
    with pytest.raises(ValueError, match="item 0: mask has labels outside 0..255"):
        AugmentedPairs([(Image.fromarray(np.zeros((4, 4, 3), np.uint8)), GRID4 * 100)], 3, random_source="numpy",
                       resample="pil", scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
    with pytest.raises(ValueError, match="needs random_source='torch'"):
        full_crop_pairs(jitter=0.1)
    with pytest.raises(ValueError, match="needs mean and std"):
        full_crop_pairs(resample="tensor")
    with pytest.raises(ValueError, match="random_source must be one of"):
        full_crop_pairs(random_source="python")
