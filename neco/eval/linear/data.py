"""Training data of the linear segmentation protocol (METHOD.md §6.4): joint image/mask augmentation and subsets.

The augmentation is the reference's: a RandomResizedCrop of image and mask together (torchvision's sampling
rule, bilinear image, nearest mask) to the input size, then a horizontal flip with probability 0.5. The
random draws of image ``i`` in epoch ``e`` come from a generator seeded with ``(seed, e, i)``, so an epoch's
crops do not depend on the number of loader workers or the order in which they pick up items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from neco.eval.primitives.labels import CENTRE, LEGACY_NEAREST, resize_label_map

__all__ = [
    "random_resized_crop_params",
    "AugmentedPairs",
    "train_subset",
]


def random_resized_crop_params(
    rng: np.random.Generator, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop, by the rule of torchvision's ``RandomResizedCrop.get_params``.

    Ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first
    that fits is placed uniformly. If none fits, a central crop clamped to the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedPairs(Dataset):
    """``(uint8 image (3, S, S), uint8 mask (m, m))``: crop, resize, flip; masks then nearest to ``mask_size``.

    As the reference: the crop is resized (PIL, nearest for the mask) and flipped at the input size, and the
    mask is shrunk to ``mask_size`` afterwards with ``label_resize`` (the training step's ``F.interpolate``).
    The order matters: torch's nearest is not mirror-symmetric.

    Images stay uint8 until the batch is on the device (normalised there), which keeps the loader workers'
    output four times smaller than float32. Call :meth:`set_epoch` before each epoch for fresh crops.
    """

    def __init__(
        self,
        dataset,
        indices: Sequence[int],
        image_size: int,
        mask_size: int | None,
        scale: Sequence[float] = (0.8, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        seed: int = 0,
        label_resize: str = LEGACY_NEAREST,
    ):
        self.label_resize = label_resize
        self.dataset, self.indices = dataset, list(indices)
        self.image_size, self.mask_size = image_size, mask_size
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        img, mask = self.dataset[index]
        img = img.convert("RGB")
        mask = np.asarray(mask, dtype=np.int32)
        if mask.shape != (img.height, img.width):
            raise ValueError(f"item {index}: mask {mask.shape} and image {(img.height, img.width)} differ in size")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        top, left, h, w = random_resized_crop_params(rng, img.height, img.width, self.scale, self.ratio)
        box = (left, top, left + w, top + h)
        size = (self.image_size, self.image_size)
        img = img.crop(box).resize(size, Image.Resampling.BILINEAR)
        m = resize_label_map(mask, size, CENTRE, box=box)  # PIL's crop(box).resize(NEAREST)
        x = np.asarray(img)
        if rng.random() < self.hflip:
            x, m = x[:, ::-1], m[:, ::-1]
        if self.mask_size is not None and self.mask_size != self.image_size:
            # The second nearest step, the one the validation masks get (neco.eval.primitives.labels.resize_mask).
            m = resize_label_map(m, self.mask_size, self.label_resize)
        if m.min() < 0 or m.max() > 255:
            raise ValueError(f"mask of item {index} has labels outside 0..255")
        # Copies: PIL's arrays are read-only and the flipped ones are views with negative strides.
        return torch.from_numpy(x.copy()).permute(2, 0, 1), torch.from_numpy(m.astype(np.uint8))


def _image_ids(dataset, indices: Sequence[int]) -> list[str]:
    # Datasets without ids (SyntheticScenes) are identified by position, which is stable for them.
    image_id = getattr(dataset, "image_id", None)
    return [image_id(i) if image_id else str(i) for i in indices]


def train_subset(dataset, fraction: float, seed: int, out_file: Path | None = None) -> list[int]:
    """Indices of a seeded random ``fraction`` of ``dataset`` (all of it, in order, for 1.0).

    COCO-Stuff/Things train on a random 10 % of train2017 (METHOD.md §6.4): ``int(N * fraction)`` images, as the
    reference, drawn from the images sorted by id so that the draw depends on the seed only (the reference
    shuffled an unordered directory listing, which no one can reproduce). The chosen ids are written to
    ``out_file``, one per line, so a result can be re-run on exactly its images.
    """
    n = len(dataset)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        indices = list(range(n))
    else:
        ids = _image_ids(dataset, range(n))
        order = sorted(range(n), key=lambda i: ids[i])
        perm = np.random.default_rng(seed).permutation(n)
        indices = sorted(order[j] for j in perm[: int(n * fraction)])
        if not indices:
            raise ValueError(f"train_fraction {fraction} of {n} images selects none")
    if out_file is not None:
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text("".join(f"{i}\n" for i in _image_ids(dataset, indices)))
    return indices
