"""Nearest-neighbour resizing of label maps (ground truth, cluster ids, foreground masks): the one place where
labels change size, with each sampling rule that moves a number named.

A nearest resize from ``src`` to ``dst`` pixels reads, for every output pixel ``j``, one source pixel. Two
rules are in use (``neco.choices.LabelResize``), and on the same features they give mIoU values 0.1-0.8 points
apart:

* ``legacy_nearest``: torch's ``F.interpolate(mode="nearest")``, source ``floor(j * src / dst)``, the top-left
  source pixel of each output cell. The reference evaluation code shrinks ground truth (448 -> 100) and
  upsamples cluster maps (32 -> 100) this way, and the Hummingbird evaluator resizes its validation masks this
  way (the mask is a tensor when it is resized). The default of every protocol.
* ``centre``: PIL's ``NEAREST``, the source pixel under the centre of each output cell,
  ``floor((j + 0.5) * src / dst)``. What the loaders do when they resize a PIL mask; kept as an option.

Both index maps are read off the libraries themselves (torch computes the scale in float32, PIL accumulates
positions its own way and rounds some exact ties down), so ties round exactly as they do there. Nearest
resizing is separable, so a 2-D resize is a gather of rows then columns.

Where the steps happen matters as much as the rule: :func:`resize_label_map` with ``box`` crops first and
resizes the crop (PIL's ``crop().resize()``, torchvision's ``resized_crop``), :func:`resize_mask` resizes to the
input size and then again to the evaluation size, and :func:`tokens_to_mask` brings token maps onto masks that
went through such a pipeline.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from neco.choices import LabelResize

__all__ = [
    "LEGACY_NEAREST",
    "CENTRE",
    "LABEL_RESIZE_MODES",
    "nearest_source_indices",
    "resize_label_map",
    "resize_mask",
    "tokens_to_mask",
]

LEGACY_NEAREST = LabelResize.legacy_nearest
CENTRE = LabelResize.centre
LABEL_RESIZE_MODES = tuple(LabelResize)


@functools.lru_cache(maxsize=64)
def _indices(src: int, dst: int, mode: str) -> np.ndarray:
    if mode == LEGACY_NEAREST:
        ramp = torch.arange(src, dtype=torch.float32).view(1, 1, src)  # exact below 2**24
        return F.interpolate(ramp, size=dst, mode="nearest").view(dst).round().long().numpy()
    if mode == CENTRE:
        ramp = Image.fromarray(np.arange(src, dtype=np.int32)[None, :])  # mode "I"
        return np.asarray(ramp.resize((dst, 1), Image.Resampling.NEAREST))[0].astype(np.int64)
    raise ValueError(f"label resize mode must be one of {[str(m) for m in LABEL_RESIZE_MODES]}, got {mode!r}")


def nearest_source_indices(src: int, dst: int, mode: str = LEGACY_NEAREST) -> torch.Tensor:
    """Source index (int64) read by each of the ``dst`` output pixels of one axis."""
    return torch.from_numpy(_indices(int(src), int(dst), str(mode)).copy())


def resize_label_map(labels, size: int | tuple[int, int], mode: str = LEGACY_NEAREST,
                     box: tuple[int, int, int, int] | None = None):
    """Nearest resize of label maps ``(..., H, W)`` (numpy array or tensor, same type and dtype back) to ``size``.

    ``box``: ``(left, top, right, bottom)`` (PIL's convention), the region that is resized: crop first, then
    resize the crop, as PIL's ``crop(box).resize()`` (``centre``) and torchvision's ``resized_crop``
    (``legacy_nearest``) do. It must lie inside the map (those libraries would pad, differently).
    """
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = labels.shape[-2:]
    top, left = 0, 0
    if box is not None:
        left, top, right, bottom = (int(v) for v in box)
        if not (0 <= left < right <= w and 0 <= top < bottom <= h):
            raise ValueError(f"crop box {tuple(box)} does not lie inside the {h}x{w} label map")
        h, w = bottom - top, right - left
    rows, cols = _indices(h, oh, str(mode)) + top, _indices(w, ow, str(mode)) + left
    if isinstance(labels, torch.Tensor):
        rows_t, cols_t = torch.from_numpy(rows).to(labels.device), torch.from_numpy(cols).to(labels.device)
        return labels.index_select(-2, rows_t).index_select(-1, cols_t)
    return np.take(np.take(np.asarray(labels), rows, axis=-2), cols, axis=-1)


def resize_mask(mask, size: int, mask_size: int | None = None, label_resize: str = LEGACY_NEAREST,
                input_resize: str = CENTRE) -> np.ndarray:
    """Nearest resize of a label map to ``size``, then (if given) nearest again to ``mask_size``: METHOD.md §5.

    ``input_resize``: how the loader brings the mask to the input size (NeCo's loaders and the quick check
    resize the PIL mask: ``centre``; the Hummingbird evaluator resizes a tensor: ``legacy_nearest``).
    ``label_resize``: how the evaluation shrinks it to ``mask_size`` (the reference: torch's ``legacy_nearest``).
    Two steps are not one: 4x4 -> 4 -> 2 with ``centre`` then ``legacy_nearest`` is not 4x4 -> 2 with either.
    Returns int32.
    """
    m = resize_label_map(np.asarray(mask, dtype=np.int32), size, input_resize)
    if mask_size is not None and mask_size != size:
        m = resize_label_map(m, mask_size, label_resize)
    return np.ascontiguousarray(m)


def tokens_to_mask(labels: torch.Tensor, image_size: int, mask_size: int, mode: str = LEGACY_NEAREST):
    """Token label maps ``(N, g, g)`` (cluster ids) brought onto ``mask_size`` ground truth.

    ``legacy_nearest``: the reference interpolates the token map itself to the mask size. ``centre``: mask
    pixel ``j`` shows input pixel ``idx[j]`` (the masks went ``image_size -> mask_size`` with the same rule),
    which lies in token ``idx[j] // patch``; a token-constant ground truth then comes back exactly.
    """
    g = labels.shape[-1]
    if mode == LEGACY_NEAREST:
        return resize_label_map(labels, mask_size, LEGACY_NEAREST)
    patch = image_size // g
    idx = _indices(image_size, mask_size, str(mode)) // patch
    idx = torch.from_numpy(np.minimum(idx, g - 1)).to(labels.device)
    return labels.index_select(-2, idx).index_select(-1, idx)
