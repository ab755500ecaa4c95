"""The Hummingbird evaluator's training-time augmentation of (image, mask) pairs (METHOD.md §6.3).

Per image, in the reference's order: four independent colour-jitter ops on the PIL image (brightness, contrast,
saturation, hue, each range 0.1, each applied with probability 0.5), to-tensor, normalisation, then one
RandomResizedCrop shared by image and mask (bilinear + antialias for the image, nearest for the mask), no flip.

All randomness of an item comes from its own ``torch.Generator`` seeded by ``(seed, epoch, index)``, so the memory
is the same whatever the number of loader workers or the order they run in. The draws are taken in exactly the
order torchvision's ``RandomApply(ColorJitter(...))`` and ``RandomResizedCrop.get_params`` take them from the
global generator, so a generator seeded like ``torch.manual_seed(s)`` reproduces the reference's pipeline
bit for bit (tests/test_hbird_memory.py checks this against torchvision).

The crop's area scale is [0.5, 2.0] in the reference: torchvision's ``get_params`` rejects every draw whose box
does not fit in the image (``w > width`` or ``h > height``), retries up to 10 times, and then falls back to a
central crop (the whole image when its aspect ratio lies in [3/4, 4/3]). Scales above 1 therefore never produce
a zoom-out; they only make the whole-image fallback more likely. Measured over 20,000 draws: a 500x500 image
gets the whole image 6 % of the time and a 500x375 one 15 %, otherwise a crop of 50-100 % of the area (mean
71 %). :func:`crop_params` keeps exactly that behaviour rather than "fixing" it, since the published numbers
were made with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from neco.eval.primitives.labels import LEGACY_NEAREST, resize_label_map

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def item_generator(*keys: int) -> torch.Generator:
    """A generator seeded from integer keys (e.g. seed, epoch, index) through numpy's SeedSequence."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def color_jitter(img: Image.Image, g: torch.Generator, strength: float = 0.1, p: float = 0.5) -> Image.Image:
    """``RandomApply([ColorJitter(<op>=strength)], p)`` for the four ops in turn, drawing from ``g``."""
    for op in JITTER_OPS:
        if p < torch.rand(1, generator=g):  # RandomApply skips when p < u
            continue
        torch.randperm(4, generator=g)  # ColorJitter draws its (here irrelevant) op order first
        if op == "hue":
            factor = float(torch.empty(1).uniform_(-strength, strength, generator=g))
            img = TF.adjust_hue(img, factor)
        else:
            factor = float(torch.empty(1).uniform_(max(0.0, 1 - strength), 1 + strength, generator=g))
            img = getattr(TF, f"adjust_{op}")(img, factor)
    return img


def crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    g: torch.Generator,
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` with an explicit generator: ``(top, left, h, w)``, same draws."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:  # a box larger than the image is rejected, never padded
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_pair(
    img: Image.Image,
    mask: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    g: torch.Generator,
    scale: Sequence[float] = (0.5, 2.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    jitter: float = 0.1,
    jitter_p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented pair: normalised float ``(3, size, size)`` image, long ``(size, size)`` mask."""
    img = color_jitter(img.convert("RGB"), g, jitter, jitter_p)
    x = TF.normalize(TF.to_tensor(img), list(mean), list(std))
    mask = torch.as_tensor(np.asarray(mask)).long()
    if mask.shape != x.shape[1:]:
        raise ValueError(f"mask {tuple(mask.shape)} and image {tuple(x.shape[1:])} sizes differ")
    i, j, h, w = crop_params(x.shape[1], x.shape[2], scale, ratio, g)
    x = TF.resized_crop(x, i, j, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    # torchvision's resized_crop of the mask tensor (torch's nearest), as the reference's ToTensor-ed mask.
    return x, resize_label_map(mask, size, LEGACY_NEAREST, box=(j, i, j + w, i + h))


class AugmentedPairs(Dataset):
    """``(image, mask)`` of every image of ``dataset`` for one augmentation epoch, deterministic per item."""

    def __init__(self, dataset, size: int, mean, std, seed: int, epoch: int, scale=(0.5, 2.0),
                 ratio=(3 / 4, 4 / 3), jitter: float = 0.1, jitter_p: float = 0.5):
        self.dataset, self.size, self.mean, self.std = dataset, size, tuple(mean), tuple(std)
        self.seed, self.epoch = seed, epoch
        self.scale, self.ratio, self.jitter, self.jitter_p = tuple(scale), tuple(ratio), jitter, jitter_p

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, mask = self.dataset[index]
        g = item_generator(self.seed, self.epoch, index)
        return augment_pair(img, mask, self.size, self.mean, self.std, g, self.scale, self.ratio,
                            self.jitter, self.jitter_p)
