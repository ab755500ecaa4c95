"""Foreground masks from the teacher's last-block CLS attention (METHOD.md §3.8), used only by loss.mask=fg|bg.

Two details follow the reference by default, each with an option (README, "Faithful to the reference"):
the blur pads by reflection as torchvision's ``GaussianBlur`` (``loss.mask_blur_padding=zeros``), and an aligned
cell is foreground only when its aligned mask value reaches 1.0 exactly (``loss.fg_cell_rule=tolerant``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.transforms import functional as TF

from neco.errors import ConfigError

BLUR_PADDINGS = ("reflect", "zeros")  # reflect: torchvision's GaussianBlur, as the reference
FG_CELL_RULES = ("exact", "tolerant")  # exact: aligned value >= 1.0, as the reference; tolerant: >= 1 - 1e-6


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 7, sigma: float = 0.6,
                  padding: str = "reflect") -> torch.Tensor:
    """Gaussian blur of `(N, 1, H, W)` maps.

    `reflect` is torchvision's `GaussianBlur` (what the reference and the evaluation's attention masks use);
    `zeros` pads with zeros, which lowers the blurred values within `kernel_size // 2` cells of the border.
    """
    if padding == "reflect":
        return TF.gaussian_blur(maps, [kernel_size, kernel_size], [sigma, sigma])
    if padding != "zeros":
        raise ConfigError(f"loss.mask_blur_padding={padding!r}: choose one of {', '.join(BLUR_PADDINGS)}")
    half = kernel_size // 2
    x = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - half
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    maps = F.conv2d(maps, k.view(1, 1, 1, -1), padding=(0, half))
    return F.conv2d(maps, k.view(1, 1, -1, 1), padding=(half, 0))


def foreground_cells(aligned: torch.Tensor, rule: str = "exact") -> torch.Tensor:
    """Boolean foreground of ROI-aligned masks: a cell counts when every sample in it lies inside the mask.

    `exact` (reference) keeps aligned values >= 1.0, so a cell whose bilinear weights sum to 1 - 1 ulp is
    dropped; `tolerant` keeps values >= 1 - 1e-6, which keeps those cells too (about 1 % of fully covered cells).
    """
    if rule == "exact":
        return aligned >= 1.0
    if rule == "tolerant":
        return aligned >= 1.0 - 1e-6
    raise ConfigError(f"loss.fg_cell_rule={rule!r}: choose one of {', '.join(FG_CELL_RULES)}")


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


def attention_foreground(cls_attention: torch.Tensor, fraction: float = 0.6,
                         blur_padding: str = "reflect") -> torch.Tensor:
    """`(N, heads, h, w)` CLS-to-patch attention -> `(N, 1, h, w)` float foreground mask (1 = foreground)."""
    maps = cls_attention.float().mean(dim=1, keepdim=True)
    maps = gaussian_blur(maps, padding=blur_padding)
    mask = keep_mass(maps, fraction)
    return drop_small_components(mask).float()
