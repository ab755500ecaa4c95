"""Augmented (image, label map) pairs: the training data of the Hummingbird memory and the linear head.

Per item, in this order: optional colour jitter of the PIL image, one random resized crop shared by image and
mask (:func:`neco.data.crops.random_resized_crop_params`), an optional horizontal flip of both, an optional
second nearest shrink of the mask. Every draw of item ``index`` in epoch ``epoch`` comes from that item's own
generator seeded with ``(seed, epoch, index)``, so an epoch's pairs do not depend on the number of loader
workers or the order in which they pick up items. The behaviours that differ between the protocols are named
parameters, each protocol's reference as it stands:

``random_source``
    ``"torch"``: a ``torch.Generator`` (:func:`item_generator`), whose draws can replay torchvision's pipeline
    bit for bit (Hummingbird, METHOD.md §6.3). ``"numpy"``: ``numpy.random.default_rng([seed, epoch, index])``
    and the crop rule in float64 (linear, METHOD.md §6.4). The two give different crops on the same seed.
``resample``
    ``"tensor"``: to tensor, normalise with ``mean``/``std``, then torch's ``resized_crop`` (bilinear with
    antialias for the image, nearest on the float mask); returns a float ``(3, S, S)`` image and a long
    ``(S, S)`` mask (Hummingbird). ``"pil"``: PIL crop and resize (bilinear image, nearest on a mode "I" mask);
    returns uint8 image ``(3, S, S)`` and uint8 mask, a quarter of float32's size through the loader workers,
    normalised later on the device (linear). The two resamplers give different pixels: torch's nearest reads
    ``floor(k * scale)``, PIL's the pixel centre.
``jitter`` / ``jitter_p``
    Four independent ``RandomApply(ColorJitter(<op>=jitter), p=jitter_p)`` (brightness, contrast, saturation,
    hue) before the crop, with torchvision's draw order (Hummingbird); ``None`` draws nothing.
``hflip``
    Probability of a horizontal flip after the crop (linear: 0.5; 0 draws nothing).
``mask_size`` / ``label_resize``
    The mask is shrunk to ``mask_size`` after the flip, as the linear reference's training step does (torch's
    nearest is not mirror-symmetric, so the order matters); ``None`` keeps the crop size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from neco.data.crops import random_resized_crop_params
from neco.eval.primitives.labels import CENTRE, LEGACY_NEAREST, resize_label_map

__all__ = ["AugmentedPairs", "color_jitter", "item_generator", "RANDOM_SOURCES", "RESAMPLERS"]

RANDOM_SOURCES = ("torch", "numpy")
RESAMPLERS = ("tensor", "pil")
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


class AugmentedPairs(Dataset):
    """``(image, mask)`` of ``dataset[indices[i]]`` for one augmentation epoch (module docstring for the options).

    Call :meth:`set_epoch` before each epoch for fresh crops; :meth:`augment` is one pair from a given generator.
    """

    def __init__(
        self,
        dataset,
        size: int,
        *,
        random_source: str,
        resample: str,
        scale: Sequence[float],
        indices: Sequence[int] | None = None,
        seed: int = 0,
        epoch: int = 0,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        jitter: float | None = None,
        jitter_p: float = 0.5,
        hflip: float = 0.0,
        mask_size: int | None = None,
        label_resize: str = LEGACY_NEAREST,
    ):
        if random_source not in RANDOM_SOURCES:
            raise ValueError(f"random_source must be one of {RANDOM_SOURCES}, got {random_source!r}")
        if resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {RESAMPLERS}, got {resample!r}")
        if resample == "tensor" and (mean is None or std is None):
            raise ValueError("resample='tensor' normalises before the crop and needs mean and std")
        if jitter is not None and random_source != "torch":
            raise ValueError("colour jitter replays torchvision's draws and needs random_source='torch'")
        self.dataset, self.size = dataset, int(size)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.random_source, self.resample = random_source, resample
        self.seed, self.epoch = int(seed), int(epoch)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.jitter, self.jitter_p, self.hflip = jitter, float(jitter_p), float(hflip)
        self.mask_size, self.label_resize = mask_size, label_resize

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        img, mask = self.dataset[index]
        if self.random_source == "torch":
            rng = item_generator(self.seed, self.epoch, index)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            return self.augment(img, mask, rng)
        except ValueError as e:
            raise ValueError(f"item {index}: {e}") from e

    def augment(self, img: Image.Image, mask, rng: torch.Generator | np.random.Generator):
        """One augmented pair of a PIL image and its ``(H, W)`` label map, all draws from ``rng``."""
        img = img.convert("RGB")
        # int32: exact through the float32 of torch's nearest (ids < 2**24) and PIL's mode "I".
        mask = np.asarray(mask, dtype=np.int32)
        if mask.shape != (img.height, img.width):
            raise ValueError(f"mask {mask.shape} and image {(img.height, img.width)} differ in size")
        if self.jitter is not None:
            img = color_jitter(img, rng, self.jitter, self.jitter_p)
        top, left, h, w = random_resized_crop_params(img.height, img.width, self.scale, self.ratio, rng)
        x, m = (self._tensor_crop if self.resample == "tensor" else self._pil_crop)(img, mask, top, left, h, w)
        if self.hflip > 0 and _uniform(rng) < self.hflip:
            x, m = x.flip(-1), m.flip(-1)
        if self.mask_size is not None and self.mask_size != self.size:
            m = resize_label_map(m, self.mask_size, self.label_resize)
        if self.resample == "pil":
            if m.min() < 0 or m.max() > 255:
                raise ValueError("mask has labels outside 0..255, which uint8 cannot carry")
            m = m.to(torch.uint8)
        return x, m

    def _tensor_crop(self, img, mask, top, left, h, w):
        size = [self.size, self.size]
        x = TF.normalize(TF.to_tensor(img), list(self.mean), list(self.std))
        x = TF.resized_crop(x, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        # torchvision's resized_crop of the mask tensor (torch's nearest), as the reference's ToTensor-ed mask.
        m = resize_label_map(mask, self.size, LEGACY_NEAREST, box=(left, top, left + w, top + h))
        return x, torch.from_numpy(m).long()

    def _pil_crop(self, img, mask, top, left, h, w):
        box, size = (left, top, left + w, top + h), (self.size, self.size)
        x = np.asarray(img.crop(box).resize(size, Image.Resampling.BILINEAR))
        m = resize_label_map(mask, size, CENTRE, box=box)  # PIL's crop(box).resize(NEAREST)
        # Copies: PIL's arrays are read-only.
        return torch.from_numpy(x.copy()).permute(2, 0, 1), torch.from_numpy(m.astype(np.int64))


def _uniform(rng: torch.Generator | np.random.Generator) -> float:
    if isinstance(rng, np.random.Generator):
        return float(rng.random())
    return float(torch.rand(1, generator=rng))
