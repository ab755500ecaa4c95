"""Multi-crop training transform: global and local crops plus the boxes of their shared regions.

Each image gives ``num_global`` global crops and ``num_local`` local crops, sampled one after the other
(METHOD.md §1.2). Every crop must overlap every global crop sampled before it, so that each (global, any) crop
pair shares an image region; the boxes of that region are returned in both crops' pixel frames (METHOD.md §1.4)
so the loss can ROI-align the two feature maps onto a common grid.

The geometry is kept in pure functions (:func:`sample_crop_boxes`, :func:`pairwise_boxes`) so it can be
checked without decoding any image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from neco.data.crops import random_resized_crop_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CropSamplingError(ValueError):
    """No crop met the overlap rule within ``max_resample`` redraws (fixable in the data config)."""


def _intersection_area(a: Sequence[int], b: Sequence[int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def sample_crop_boxes(
    width: int,
    height: int,
    num_global: int = 2,
    num_local: int = 4,
    global_scale: Sequence[float] = (0.25, 1.0),
    local_scale: Sequence[float] = (0.05, 0.25),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    min_intersection: float = 0.01,
    max_resample: int = 1000,
) -> torch.Tensor:
    """Absolute crop boxes ``[x1, y1, x2, y2]`` (int64, original-image pixels), shape ``(N, 4)``.

    Crops are drawn in the order global 0..G-1, then local. A crop is redrawn while its intersection area
    with any earlier global crop is ``<= int(A * min_intersection)`` (A = image area); global crops after
    the first need twice that (METHOD.md §1.2's rule for the second global crop, extended to any further ones).
    After ``max_resample`` redraws of one crop a :class:`CropSamplingError` (a ``ValueError``) is raised
    instead of looping forever (the reference loops without bound, METHOD.md §10.12).
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot crop an empty image of size {width}x{height}")
    need = int(width * height * min_intersection)
    boxes: list[list[int]] = []
    for i in range(num_global + num_local):
        is_global = i < num_global
        scale = global_scale if is_global else local_scale
        required = 2 * need if (is_global and i >= 1) else need
        earlier_globals = boxes[: min(i, num_global)]
        for _attempt in range(max_resample + 1):
            top, left, h, w = random_resized_crop_params(height, width, scale, ratio)  # torch's global RNG
            box = [left, top, left + w, top + h]
            if all(_intersection_area(box, g) > required for g in earlier_globals):
                break
        else:
            kind = "global" if is_global else "local"
            doubled = ", doubled for later global crops" if is_global else ""
            raise CropSamplingError(
                f"a {width}x{height} image could not yield {kind} crop {i} overlapping every earlier global "
                f"crop by more than {required} square pixels (min_intersection={min_intersection} of the "
                f"image area{doubled}) after {max_resample} resamples; lower data.min_intersection or raise "
                "data.max_resample (or widen the crop scales)"
            )
        boxes.append(box)
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)


def pairwise_boxes(abs_boxes: torch.Tensor, sizes: Sequence[int], num_global: int) -> dict[str, torch.Tensor]:
    """Shared-region boxes of every (global crop g, crop j) pair in both crops' resized-pixel frames.

    ``abs_boxes``: ``(N, 4)`` absolute ``[x1, y1, x2, y2]``; ``sizes``: output side of each crop.
    Returns ``{"gc": (num_global, N, 4), "all": (N, num_global, 4)}`` float32 where ``gc[g, j]`` is the
    intersection of crops g and j in crop g's frame and ``all[j, g]`` the same region in crop j's frame
    (METHOD.md §1.4). Raises ``ValueError`` if some pair does not overlap.
    """
    # float64 so that exact ratios such as 224 * 200 / 400 come out exact before the final cast.
    b = abs_boxes.to(torch.float64).reshape(-1, 4)
    n = b.shape[0]
    s = torch.as_tensor(list(sizes), dtype=torch.float64)
    if s.numel() != n:
        raise ValueError(f"got {n} boxes but {s.numel()} crop sizes")
    g = b[:num_global, None, :]  # (G, 1, 4)
    j = b[None, :, :]  # (1, N, 4)
    inter = torch.cat([torch.maximum(g[..., :2], j[..., :2]), torch.minimum(g[..., 2:], j[..., 2:])], dim=-1)
    empty = (inter[..., 2] <= inter[..., 0]) | (inter[..., 3] <= inter[..., 1])
    if bool(empty.any()):
        gi, ji = (int(v) for v in empty.nonzero()[0])
        raise ValueError(f"crops {gi} and {ji} do not overlap: {b[gi].tolist()} vs {b[ji].tolist()}")

    def to_frame(region: torch.Tensor, frame: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        # x -> side * (x - x1) / w and y -> side * (y - y1) / h, on both corners at once.
        origin = frame[..., :2]
        extent = frame[..., 2:] - origin
        return (region - torch.cat([origin, origin], -1)) * side[..., None] / torch.cat([extent, extent], -1)

    gc = to_frame(inter, g, s[:num_global, None])  # (G, N, 4) in crop g's frame
    in_j = to_frame(inter, j, s[None, :])  # (G, N, 4) in crop j's frame
    return {"gc": gc.to(torch.float32), "all": in_j.transpose(0, 1).contiguous().to(torch.float32)}


class RandomPILGaussianBlur:
    """PIL Gaussian blur with radius (= std) ``sigma ~ U(lo, hi)`` applied with probability ``p``.

    torchvision's GaussianBlur uses a fixed kernel size, which is not the same filter as PIL's radius-only
    blur METHOD.md §1.3 prescribes, hence this small transform. Draws come from the global torch RNG.
    """

    def __init__(self, p: float = 0.5, sigma: Sequence[float] = (0.1, 2.0)):
        self.p = p
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return img
        radius = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius)) if radius > 0 else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


def photometric_transform(jitter_strength: float = 1.0, blur_strength: float = 1.0) -> T.Compose:
    """METHOD.md §1.3: colour jitter (p 0.8) -> grayscale (p 0.2) -> PIL Gaussian blur (p 0.5), on PIL images."""
    s, b = jitter_strength, blur_strength
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            RandomPILGaussianBlur(p=0.5, sigma=(0.1 * b, 2.0 * b)),
        ]
    )


class MultiCrop:
    """Image -> ``(crops, boxes)`` for NeCo training (METHOD.md §1.2-1.5).

    ``crops``: list of ``num_global`` tensors ``(3, global_size, global_size)`` followed by ``num_local``
    tensors ``(3, local_size, local_size)``, ImageNet-normalised. ``boxes``: ``{"gc": (num_global, N, 4),
    "all": (N, num_global, 4)}`` float32 in the resized crops' pixel units (see :func:`pairwise_boxes`).

    ``photometric=False`` skips jitter, grayscale and blur entirely (crops are then exact resamplings of
    the image, which is what geometry checks need). All randomness comes from torch's global RNG.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_global: int = 2,
        num_local: int = 4,
        global_scale: Sequence[float] = (0.25, 1.0),
        local_scale: Sequence[float] = (0.05, 0.25),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        min_intersection: float = 0.01,
        jitter_strength: float = 1.0,
        blur_strength: float = 1.0,
        max_resample: int = 1000,
        photometric: bool = True,
    ):
        if num_global < 1:
            raise ValueError(f"num_global must be >= 1 (every pair needs a global crop), got {num_global}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.num_global = int(num_global)
        self.num_local = int(num_local)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.ratio = tuple(ratio)
        self.min_intersection = float(min_intersection)
        self.max_resample = int(max_resample)
        self.photometric = photometric_transform(jitter_strength, blur_strength) if photometric else None
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    @property
    def sizes(self) -> list[int]:
        return [self.global_size] * self.num_global + [self.local_size] * self.num_local

    def sample_boxes(self, width: int, height: int) -> torch.Tensor:
        return sample_crop_boxes(
            width,
            height,
            self.num_global,
            self.num_local,
            self.global_scale,
            self.local_scale,
            self.ratio,
            self.min_intersection,
            self.max_resample,
        )

    def __call__(self, img: Image.Image) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        if img.mode != "RGB":
            # Grayscale or palette input would otherwise give 1-channel or index-valued tensors.
            img = img.convert("RGB")
        abs_boxes = self.sample_boxes(*img.size)
        crops = []
        for (x1, y1, x2, y2), size in zip(abs_boxes.tolist(), self.sizes, strict=True):
            crop = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size], T.InterpolationMode.BILINEAR)
            if self.photometric is not None:
                crop = self.photometric(crop)
            crops.append(self.to_tensor(crop))
        return crops, pairwise_boxes(abs_boxes, self.sizes, self.num_global)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
            f"num_global={self.num_global}, num_local={self.num_local}, global_scale={self.global_scale}, "
            f"local_scale={self.local_scale}, ratio={self.ratio}, min_intersection={self.min_intersection}, "
            f"photometric={self.photometric is not None})"
        )
