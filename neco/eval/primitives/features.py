"""Frozen patch features at evaluation resolution (METHOD.md §5), extracted once and cached on disk.

Every protocol reads the same thing: the backbone's final-norm patch tokens (CLS and registers dropped, no
projection head) of square-resized, ImageNet-normalised images, and the ground truth resized with nearest
neighbour to the input size and then, when asked, to a smaller evaluation size (100x100 in most protocols),
each step with a named nearest rule (neco.eval.primitives.labels). A sweep over protocols therefore extracts each
split once: the cache key is (weights, dataset, split, images, input size, mask size, resize rules,
normalisation, stored dtype). The quick check (neco.eval.quick) reads its features here too, with its own
normalisation order and float32 storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from neco.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco.eval.primitives.labels import CENTRE, LEGACY_NEAREST, resize_mask

log = logging.getLogger(__name__)

# The Hummingbird evaluator's normalisation: its blue std reads 0.255 (METHOD.md §10.19). Kept as its default.
HUMMINGBIRD_STD = (0.229, 0.224, 0.255)


def resize_image(img: Image.Image, size: int) -> np.ndarray:
    """Square bilinear resize; PIL's bilinear filter widens with the scale factor, i.e. it is antialiased."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


# The two orders of the normalisation arithmetic. They round differently: 61 % of the values of random uint8
# images differ, by up to 2.4e-7 (one float32 step), enough to move a feature and a number by a hair.
NORMALISE_UINT8 = "uint8"  # (x - 255 mean) / (255 std) on the raw values: the protocols and monitors
NORMALISE_UNIT = "unit"  # x / 255, then (x - mean) / std: torchvision's ToTensor + Normalize; the quick check
NORMALISE_ORDERS = (NORMALISE_UINT8, NORMALISE_UNIT)
_DEFAULT_NUMERICS = {"normalise": NORMALISE_UINT8, "feature_dtype": str(torch.float16)}


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], order: str = NORMALISE_UINT8
              ) -> torch.Tensor:
    """``uint8``-range ``(B, 3, H, W)`` or ``(3, H, W)`` float tensor in [0, 255] -> normalised float32.

    ``order``: :data:`NORMALISE_UINT8` or :data:`NORMALISE_UNIT`, which arithmetic (the same up to rounding)."""
    shape = (3, 1, 1) if x.ndim == 3 else (1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    if order == NORMALISE_UINT8:
        return (x.float() - mean_t * 255.0) / (std_t * 255.0)
    if order == NORMALISE_UNIT:
        return (x.float() / 255.0 - mean_t) / std_t
    raise ValueError(f"normalisation order must be one of {NORMALISE_ORDERS}, got {order!r}")


class _ResizedPairs(Dataset):
    """``(uint8 image (3, S, S), uint8 mask (m, m))`` for every index of a segmentation dataset."""

    def __init__(self, dataset, indices: Sequence[int], size: int, mask_size: int | None,
                 label_resize: str = LEGACY_NEAREST, input_resize: str = CENTRE):
        self.dataset, self.indices, self.size, self.mask_size = dataset, list(indices), size, mask_size
        self.label_resize, self.input_resize = label_resize, input_resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, mask = self.dataset[self.indices[i]]
        x = torch.from_numpy(resize_image(img, self.size).copy()).permute(2, 0, 1)
        m = resize_mask(mask, self.size, self.mask_size, self.label_resize, self.input_resize)
        if m.min() < 0 or m.max() > 255:
            raise ValueError(f"mask of item {self.indices[i]} has labels outside 0..255")
        return x, torch.from_numpy(m.astype(np.uint8))


def dataset_fingerprint(dataset, indices: Sequence[int]) -> str:
    """A short stable description of which images are evaluated (ids when the dataset has them)."""
    h = hashlib.sha1()
    h.update(f"{getattr(dataset, 'name', type(dataset).__name__)}|{getattr(dataset, 'split', '')}".encode())
    image_id = getattr(dataset, "image_id", None)
    for i in indices:
        h.update((image_id(i) if image_id else str(i)).encode() + b"\n")
    return h.hexdigest()[:16]


class FeatureExtractor:
    """Patch features of a frozen model over a dataset, with an optional on-disk cache.

    ``model`` maps a normalised ``(B, 3, S, S)`` batch to ``(B, h, w, D)`` final-norm patch tokens (the
    :class:`neco.models.backbone.Backbone` contract). ``model_key`` identifies its weights in the cache key;
    leave ``cache_dir`` unset to disable caching.

    :meth:`extract` returns CPU tensors: features ``float16 (N, h, w, D)`` by default (half the memory of
    float32; the protocols compute in float32 on chunks; ``feature_dtype`` keeps another dtype) and masks
    ``uint8 (N, m, m)`` (every label set used here, ignore ids included, fits in 0..255). Call ``.long()`` /
    ``.float()`` on the chunks you work on.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        model_key: str = "",
        progress: bool = True,
    ):
        self.model, self.device, self.amp_dtype = model, torch.device(device), amp_dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_key, self.progress = model_key, progress

    def _cache_path(self, dataset, indices, size, mask_size, mean, std, resize, numerics) -> Path | None:
        if self.cache_dir is None:
            return None
        parts = [self.model_key, dataset_fingerprint(dataset, indices), size, mask_size,
                 list(mean), list(std), str(self.amp_dtype), list(resize)]
        # Only settings other than the defaults extend the key, so caches written without them stay valid.
        changed = {k: v for k, v in numerics.items() if v != _DEFAULT_NUMERICS[k]}
        key = json.dumps(parts + [changed] if changed else parts)
        name = f"{getattr(dataset, 'name', 'data')}_{getattr(dataset, 'split', '')}_{size}_{mask_size}"
        return self.cache_dir / f"{name}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"

    def extract(
        self,
        dataset,
        image_size: int,
        mask_size: int | None = None,
        indices: Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        desc: str = "features",
        label_resize: str = LEGACY_NEAREST,
        input_resize: str = CENTRE,
        normalise: str = NORMALISE_UINT8,
        feature_dtype: torch.dtype = torch.float16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and masks; the masks' nearest rules as :func:`neco.eval.primitives.labels.resize_mask`,
        the arithmetic order of the normalisation as :func:`normalize`, features stored as ``feature_dtype``
        (all part of the cache key)."""
        indices = list(range(len(dataset))) if indices is None else list(indices)
        if not indices:
            raise ValueError(f"no images to extract features from ({desc})")
        if normalise not in NORMALISE_ORDERS:
            raise ValueError(f"normalisation order must be one of {NORMALISE_ORDERS}, got {normalise!r}")
        resize = (label_resize, input_resize)
        numerics = {"normalise": normalise, "feature_dtype": str(feature_dtype)}
        path = self._cache_path(dataset, indices, image_size, mask_size, mean, std, resize, numerics)
        if path is not None and path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                log.info("features: %s read from cache %s", desc, path)
                return cached["features"], cached["masks"]
            except Exception as err:  # a truncated cache file is recomputed, never trusted
                log.warning("features: ignoring unreadable cache file %s (%s)", path, err)
        feats, masks = self._run(dataset, indices, image_size, mask_size, mean, std, desc, resize, normalise,
                                 feature_dtype)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"features": feats, "masks": masks}, tmp)
            os.replace(tmp, path)  # atomic: concurrent jobs never read a half-written file
        return feats, masks

    def _run(self, dataset, indices, size, mask_size, mean, std, desc, resize, normalise, feature_dtype):
        loader = DataLoader(
            _ResizedPairs(dataset, indices, size, mask_size, *resize),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        model = self.model
        was_training = model.training
        model.eval()
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        feats = masks = None
        start = 0
        bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not self.progress, leave=False)
        try:
            with torch.inference_mode(), autocast:
                for x, m in loader:
                    x = normalize(x.to(self.device, non_blocking=True), mean, std, normalise)
                    out = model(x)
                    if out.ndim != 4 or out.shape[0] != x.shape[0]:
                        raise ValueError(f"model must return (B, h, w, D) patch features, got {tuple(out.shape)}")
                    if feats is None:  # preallocate: concatenating would hold every chunk twice
                        feats = torch.empty((len(indices), *out.shape[1:]), dtype=feature_dtype)
                        masks = torch.empty((len(indices), *m.shape[1:]), dtype=torch.uint8)
                    feats[start : start + len(out)] = out.to("cpu", feature_dtype)
                    masks[start : start + len(out)] = m
                    start += len(out)
                    bar.update(len(out))
        finally:
            bar.close()
            model.train(was_training)
        return feats, masks
