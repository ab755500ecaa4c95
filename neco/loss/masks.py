"""Foreground masks from the teacher's last-block CLS attention (spec 3.8), used only by loss.mask=fg|bg."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 7, sigma: float = 0.6) -> torch.Tensor:
    """Separable Gaussian blur of `(N, 1, H, W)` maps with zero padding."""
    half = kernel_size // 2
    x = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - half
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    maps = F.conv2d(maps, k.view(1, 1, 1, -1), padding=(0, half))
    return F.conv2d(maps, k.view(1, 1, -1, 1), padding=(half, 0))


def keep_mass(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the smallest set of cells that holds `fraction` of each map's mass."""
    flat = maps.flatten(1)
    values, order = flat.sort(dim=1)
    cum = (values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)).cumsum(dim=1)
    keep_sorted = cum > (1.0 - fraction)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.view_as(maps)


def drop_small_components(mask: torch.Tensor, max_size: int = 2) -> torch.Tensor:
    """Remove 8-connected components of at most `max_size` cells. Runs on the CPU (a host-device sync)."""
    arr = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(arr)
    structure = np.ones((3, 3), dtype=bool)
    for idx in np.ndindex(arr.shape[:-2]):
        labels, count = ndimage.label(arr[idx], structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        big = sizes > max_size
        big[0] = False
        out[idx] = big[labels]
    return torch.from_numpy(out).to(mask.device)


def attention_foreground(cls_attention: torch.Tensor, fraction: float = 0.6) -> torch.Tensor:
    """`(N, heads, h, w)` CLS-to-patch attention -> `(N, 1, h, w)` float foreground mask (1 = foreground)."""
    maps = cls_attention.float().mean(dim=1, keepdim=True)
    maps = gaussian_blur(maps)
    mask = keep_mass(maps, fraction)
    return drop_small_components(mask).float()
