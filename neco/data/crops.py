"""RandomResizedCrop parameters: torchvision's sampling rule, drawn from a torch or a numpy generator.

One rule serves the training multi-crop (METHOD.md §1.2), the Hummingbird memory (§6.3) and the linear protocol's
training crops (§6.4), the rule of torchvision's ``RandomResizedCrop.get_params``: up to ten tries of an area
fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio`` (rounded half to even); the first box
that fits inside the image is placed uniformly at random. If none fits, a central crop: the whole image when its
aspect ratio lies in ``ratio``, otherwise the full width (or height) at the nearest bound of ``ratio``. A box
larger than the image is rejected, never padded, so area scales above 1 (Hummingbird's reference [0.5, 2.0]) only
make the fallback likelier.

What differs between the users is where the random numbers come from, and with it the arithmetic
(the ``rng`` argument):

* ``None``: torch's global generator, exactly the draws and float32 arithmetic of torchvision's ``get_params``
  (training multi-crop, whose reference calls torchvision);
* a ``torch.Generator``: the same draws in the same order from that generator (Hummingbird: one per item);
* a ``numpy.random.Generator``: float64 draws (``uniform``, ``integers``) and float64 logs (linear protocol).

The same seed therefore gives different crops through torch and numpy; each user keeps the stream its results
were made with. The module lives in ``neco.data`` because training uses it and must not depend on ``neco.eval``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["CROP_ATTEMPTS", "random_resized_crop_params"]

CROP_ATTEMPTS = 10  # torchvision's number of tries before the central fallback


class _TorchDraws:
    """torchvision's draws: float32 tensors, ``generator=None`` being torch's global generator."""

    def __init__(self, generator: torch.Generator | None, ratio: Sequence[float]):
        self.generator = generator
        self.log_ratio = torch.log(torch.tensor(list(ratio)))

    def area_fraction(self, lo: float, hi: float) -> float:
        return torch.empty(1).uniform_(lo, hi, generator=self.generator).item()

    def aspect_ratio(self) -> float:
        log = torch.empty(1).uniform_(self.log_ratio[0], self.log_ratio[1], generator=self.generator)
        return torch.exp(log).item()

    def offset(self, count: int) -> int:
        return torch.randint(0, count, size=(1,), generator=self.generator).item()


class _NumpyDraws:
    """The same rule on a numpy generator, in float64."""

    def __init__(self, rng: np.random.Generator, ratio: Sequence[float]):
        self.rng = rng
        self.log_lo, self.log_hi = math.log(ratio[0]), math.log(ratio[1])

    def area_fraction(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)

    def aspect_ratio(self) -> float:
        return math.exp(self.rng.uniform(self.log_lo, self.log_hi))

    def offset(self, count: int) -> int:
        return int(self.rng.integers(0, count))


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: torch.Generator | np.random.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of one random resized crop of a ``height`` x ``width`` image (module docstring).

    The fallback follows torchvision to the letter, including its rounding: a 1-pixel-wide image with a ratio
    range [2, 3] gets ``h = round(1 / 2) = 0``, a crop that callers must be ready to refuse.
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot crop an empty image of size {width}x{height}")
    if isinstance(rng, np.random.Generator):
        draws = _NumpyDraws(rng, ratio)
    elif rng is None or isinstance(rng, torch.Generator):
        draws = _TorchDraws(rng, ratio)
    else:
        raise TypeError(f"rng must be None, a torch.Generator or a numpy Generator, got {type(rng).__name__}")
    area = height * width
    for _ in range(CROP_ATTEMPTS):
        target_area = area * draws.area_fraction(scale[0], scale[1])
        aspect = draws.aspect_ratio()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = draws.offset(height - h + 1)
            left = draws.offset(width - w + 1)
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
