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
71 %). The crop rule (:mod:`neco.data.crops`) keeps exactly that behaviour rather than "fixing" it, since the
published numbers were made with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from neco.eval.primitives.pairs import AugmentedPairs


def memory_pairs(
    dataset,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    epoch: int,
    scale: Sequence[float] = (0.5, 2.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    jitter: float = 0.1,
    jitter_p: float = 0.5,
) -> AugmentedPairs:
    """One epoch of the memory's pairs: normalised float ``(3, size, size)`` images, long ``(size, size)`` masks."""
    return AugmentedPairs(dataset, size, random_source="torch", resample="tensor", scale=scale, ratio=ratio,
                          seed=seed, epoch=epoch, mean=mean, std=std, jitter=jitter, jitter_p=jitter_p)
