"""The Hummingbird memory ("support set"): augmented training patches, their features and label counts (METHOD.md §6.3).

For every augmentation epoch and training image: run the frozen model on the augmented crop, L2-normalise the
patch features, count the classes of the ``p x p`` pixels under every patch, keep every patch (unbounded memory)
or ``k`` of them chosen by the rarity score (bounded memory), and write them into storage allocated once for the
whole memory (nothing is concatenated, so the memory is never held twice).

Feature normalisation (``memory_norm``): ``per_patch`` divides every patch feature by its own norm (the
evaluator since November 2024). ``per_image_axis_v1`` is what open-hummingbird-eval releases up to 1.1.0 did:
``features / torch.norm(features, dim=1)`` on ``(B, N, d)`` features, i.e. every feature dimension divided by
its norm over the image's kept patches (all ``S*S``, or the ``k`` sampled ones of a bounded memory, which
those releases normalised after the sampling). Such rows are not unit vectors; their norms are returned so
that the vote can use cosine similarities as those releases did (they re-normalised the retrieved keys).

Labels are stored as integer pixel counts per class, ``(rows, C)``: ``uint8`` when ``p * p <= 255`` (patch 14:
196 pixels), ``int16`` otherwise (patch 16: 256). The histogram the reference stores, "mean of the one-hot pixels",
is ``counts / counts.sum()`` and is formed exactly at vote time; counts take half (or a quarter) of the memory of
float32 histograms and carry no rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neco.errors import ConfigError
from neco.eval.hummingbird.augment import memory_pairs
from neco.eval.primitives.pairs import item_generator

EMPTY_PATCH_SCORE = 1e6  # the reference's score for a patch without any counted class: kept last
PER_PATCH = "per_patch"
PER_IMAGE_AXIS_V1 = "per_image_axis_v1"
MEMORY_NORMS = (PER_PATCH, PER_IMAGE_AXIS_V1)


def normalise_memory_features(feats: torch.Tensor, memory_norm: str) -> torch.Tensor:
    """``(B, P, d)`` features of the patches kept per image, normalised as ``memory_norm`` (module docstring)."""
    if memory_norm == PER_PATCH:
        return F.normalize(feats, dim=-1)
    if memory_norm == PER_IMAGE_AXIS_V1:
        return F.normalize(feats, dim=1)
    raise ValueError(f"memory_norm must be one of {MEMORY_NORMS}, got {memory_norm!r}")


def label_dtype(patch_size: int) -> torch.dtype:
    """Smallest integer type holding a patch's pixel count."""
    return torch.uint8 if patch_size * patch_size <= 255 else torch.int16


def patch_label_counts(
    masks: torch.Tensor,
    patch_size: int,
    num_classes: int,
    ignore_index: int | None,
    ignore_to_background: bool = True,
) -> torch.Tensor:
    """Pixel counts per class under every patch: ``(B, S*S, C)`` int64, patches in row-major order.

    ``ignore_to_background=True`` is the reference (METHOD.md §10.19): label 255 becomes class 0 and every other
    label is a class, so a patch's counts always sum to ``p * p``. ``False`` leaves the dataset's
    ``ignore_index`` pixels out of the counts (a patch of only such pixels is empty).
    """
    b, h, w = masks.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {p}")
    labels = masks.long()
    if ignore_to_background:
        labels = torch.where(labels == 255, 0, labels)  # the reference maps the value 255, whatever the dataset
        valid = torch.ones_like(labels, dtype=torch.bool)
    else:
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"mask labels outside [0, {num_classes}) that are not the ignore label")
    gh, gw = h // p, w // p
    cell = (torch.arange(h, device=labels.device) // p).view(1, h, 1) * gw + (
        torch.arange(w, device=labels.device) // p
    ).view(1, 1, w)
    cell = cell + torch.arange(b, device=labels.device).view(b, 1, 1) * (gh * gw)
    # Uncounted pixels go to an extra class column that is dropped: no boolean gather needed.
    flat = cell * (num_classes + 1) + torch.where(valid, labels, num_classes)
    counts = torch.bincount(flat.reshape(-1), minlength=b * gh * gw * (num_classes + 1))
    return counts.view(b, gh * gw, num_classes + 1)[..., :num_classes]


def rarity_scores(counts: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reference's patch scores ``(B, P)``: lower = rarer = kept first.

    ``freq[c]`` = number of the image's patches containing class ``c``; a patch scores the sum of ``freq`` over
    the classes it contains, times its ``U(0, 1)`` noise; a patch containing no class scores 1e6.
    """
    present = counts > 0
    freq = present.sum(dim=1, keepdim=True).float()  # (B, 1, C)
    score = (present.float() * freq).sum(dim=-1) * noise
    return torch.where(present.any(dim=-1), score, torch.full_like(score, EMPTY_PATCH_SCORE))


def rarity_select(counts: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` lowest-scoring patches of each image."""
    return rarity_scores(counts, noise).topk(k, dim=1, largest=False).indices


def per_image_quota(memory_size: int | None, num_images: int, epochs: int, cells: int, clamp: bool) -> int:
    """Patches kept per augmented image: ``memory_size // (num_images * epochs)`` or all ``cells``."""
    if memory_size is None:
        return cells
    k = memory_size // (num_images * epochs)
    if k < 1:
        raise ConfigError(f"eval.hummingbird.memory_size={memory_size} is smaller than the number of augmented "
                          f"training images ({num_images} x {epochs} epochs): raise it or set it to null")
    if k > cells:
        if clamp:
            return cells
        raise ConfigError(
            f"eval.hummingbird.memory_size={memory_size} asks for {k} patches per image "
            f"({memory_size} // ({num_images} images x {epochs} augmentation epochs)) but an image has only "
            f"{cells}; use a smaller memory_size (at most {cells * num_images * epochs}), memory_size=null "
            "(keep every patch), or eval.hummingbird.clamp_memory_quota=true")
    return k


@dataclass
class MemoryPlan:
    """Sizes fixed before the first forward pass: every row of the memory has its place."""

    num_images: int
    epochs: int
    grid: int  # S: patches per side
    per_image: int  # k
    rows: int  # num_images * epochs * k filled rows
    clamped: bool = False  # the requested quota exceeded S^2 and was cut to S^2

    @classmethod
    def make(cls, memory_size, num_images, epochs, grid, clamp=False):
        k = per_image_quota(memory_size, num_images, epochs, grid * grid, clamp)
        clamped = memory_size is not None and memory_size // (num_images * epochs) > k
        return cls(num_images, epochs, grid, k, num_images * epochs * k, clamped)

    def zero_rows(self, memory_size: int | None, pad: bool) -> int:
        """Rows of a ``memory_size`` allocation left unfilled (zero) in the reference; none when clamped."""
        return memory_size - self.rows if (memory_size is not None and pad and not self.clamped) else 0


def build_memory(
    model: torch.nn.Module,
    dataset,
    index,
    plan: MemoryPlan,
    *,
    image_size: int,
    patch_size: int,
    num_classes: int,
    ignore_index: int | None,
    mean,
    std,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    ignore_to_background: bool = True,
    crop_scale=(0.5, 2.0),
    crop_ratio=(3 / 4, 4 / 3),
    jitter: float = 0.1,
    jitter_p: float = 0.5,
    progress: bool = False,
    memory_norm: str = PER_PATCH,
    row_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``index`` (``.add(features)``) with the memory's features; return its label counts ``(rows, C)``.

    ``row_norms`` (``(rows,)`` float32), when given, receives the norm of every stored feature row.
    """
    labels = torch.empty((plan.rows, num_classes), dtype=label_dtype(patch_size), device=device)
    k, cells = plan.per_image, plan.grid * plan.grid
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    pos = 0
    bar = tqdm(total=plan.num_images * plan.epochs, desc="hummingbird memory", unit="img", disable=not progress,
               leave=False)
    try:
        for epoch in range(plan.epochs):
            loader = DataLoader(
                memory_pairs(dataset, image_size, mean, std, seed, epoch, crop_scale, crop_ratio, jitter, jitter_p),
                batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
            )
            start = 0
            for x, m in loader:
                with torch.inference_mode(), autocast:
                    out = model(x.to(device, non_blocking=True))
                if out.ndim != 4 or out.shape[1:3] != (plan.grid, plan.grid):
                    raise ValueError(f"model returned {tuple(out.shape)}; expected (B, {plan.grid}, {plan.grid}, D)")
                b = out.shape[0]
                feats = out.float().reshape(b, cells, -1)
                counts = patch_label_counts(m.to(device), patch_size, num_classes, ignore_index,
                                            ignore_to_background)
                if k < cells:
                    # One noise stream per (epoch, image): the memory does not depend on the batch size.
                    noise = torch.stack([torch.rand(cells, generator=item_generator(seed, epoch, start + i, 1))
                                         for i in range(b)]).to(device)
                    keep = rarity_select(counts, k, noise)
                    feats = feats.gather(1, keep[..., None].expand(-1, -1, feats.shape[-1]))
                    counts = counts.gather(1, keep[..., None].expand(-1, -1, num_classes))
                feats = normalise_memory_features(feats, memory_norm).reshape(b * k, -1)
                index.add(feats)
                if row_norms is not None:
                    row_norms[pos : pos + b * k] = feats.norm(dim=-1).to(row_norms)
                labels[pos : pos + b * k] = counts.reshape(b * k, num_classes).to(labels.dtype)
                pos += b * k
                start += b
                bar.update(b)
    finally:
        bar.close()
        model.train(was_training)
    if pos != plan.rows:
        raise RuntimeError(f"memory filled {pos} of {plan.rows} rows: the dataset changed length while read")
    return labels
