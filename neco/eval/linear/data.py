"""Training data of the linear segmentation protocol (METHOD.md §6.4): joint image/mask augmentation and subsets.

The augmentation is the reference's: a RandomResizedCrop of image and mask together (torchvision's sampling
rule, bilinear image, nearest mask) to the input size, then a horizontal flip with probability 0.5. The
random draws of image ``i`` in epoch ``e`` come from a generator seeded with ``(seed, e, i)``, so an epoch's
crops do not depend on the number of loader workers or the order in which they pick up items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neco.eval.primitives.labels import LEGACY_NEAREST
from neco.eval.primitives.pairs import AugmentedPairs

__all__ = [
    "training_pairs",
    "train_subset",
]


def training_pairs(
    dataset,
    indices: Sequence[int],
    image_size: int,
    mask_size: int | None,
    scale: Sequence[float] = (0.8, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    seed: int = 0,
    label_resize: str = LEGACY_NEAREST,
) -> AugmentedPairs:
    """``(uint8 image (3, S, S), uint8 mask (m, m))``: crop, resize, flip; masks then nearest to ``mask_size``.

    As the reference: the crop is resized (PIL, nearest for the mask) and flipped at the input size, and the
    mask is shrunk to ``mask_size`` afterwards with ``label_resize`` (the training step's ``F.interpolate``).
    Images stay uint8 until the batch is on the device (normalised there), which keeps the loader workers'
    output four times smaller than float32. Call ``set_epoch`` before each epoch for fresh crops.
    """
    return AugmentedPairs(dataset, image_size, random_source="numpy", resample="pil", scale=scale, ratio=ratio,
                          indices=indices, seed=seed, hflip=hflip, mask_size=mask_size, label_resize=label_resize)


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
