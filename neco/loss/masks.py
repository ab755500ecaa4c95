"""Foreground masks from a ViT's last-block CLS attention: the one implementation every user calls.

The same pipeline serves three users, each with the parameters of its METHOD.md section:

- the fg/bg loss masks, METHOD.md §3.8 (``neco.engine.trainer``, ``neco.heldout``): 60 % of the mass
  (``TRAINING_MASS_FRACTION``), reflect-padded blur by default, ``loss.mask_blur_padding=zeros`` on request;
- the noisy foreground of unsupervised segmentation, METHOD.md §6.5.2 (``neco.eval.unsupervised.protocol``):
  65 % of the mass, blur and component size from ``eval.unsup_seg`` (``attention_keep``, ``blur_sigma``,
  ``blur_kernel``, ``min_component``);
- the attention-map monitor, METHOD.md §6.6 (``neco.eval.monitors``): 60 % of the mass (``eval.attn_threshold``) for
  the merged map; each head alone through ``keep_mass`` only (no blur, no clean-up).

Every user keeps the reference's 7x7, sigma 0.6 Gaussian, its cumulative-mass rule (``keep_mass``) and removes
8-connected components of at most 2 cells; what may differ between users is a parameter here: the mass
fraction, the blur padding, the blur size and the smallest component kept.

Why here: the training objective must not import the evaluation package (the evaluation depends on the training
code, never the reverse: tests/test_import_graph.py), so the maths lives at the lower layer and
``neco.eval.primitives.foreground`` keeps only what is evaluation-only (running a model over a dataset for its
attention, reading the reference's precomputed masks). One more module for these few functions would add a
layer without removing an edge.

The loss-only rule for ROI-aligned masks (``foreground_cells``) follows the reference too, with an option
(README, "Faithful to the reference"): an aligned cell is foreground only when its aligned mask value reaches
1.0 exactly (``loss.fg_cell_rule=tolerant`` keeps cells 1 ulp short of it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.transforms import functional as TF

from neco.errors import ConfigError

BLUR_PADDINGS = ("reflect", "zeros")  # reflect: torchvision's GaussianBlur, as the reference (METHOD.md §10.30)
FG_CELL_RULES = ("exact", "tolerant")  # exact: aligned value >= 1.0, as the reference; tolerant: >= 1 - 1e-6

TRAINING_MASS_FRACTION = 0.6  # METHOD.md §3.8: the cells holding 60 % of the attention mass


def gaussian_blur(maps: torch.Tensor, kernel_size: int = 7, sigma: float = 0.6,
                  padding: str = "reflect") -> torch.Tensor:
    """Gaussian blur of each ``(H, W)`` map of ``(..., H, W)`` maps.

    ``reflect`` is torchvision's ``GaussianBlur`` (the reference, for every user); it mirrors without repeating
    the edge, so each side needs more than ``kernel_size // 2`` cells. ``zeros`` pads with zeros, which lowers
    the blurred values within ``kernel_size // 2`` cells of the border (``loss.mask_blur_padding=zeros``).
    """
    if padding not in BLUR_PADDINGS:
        raise ConfigError(f"loss.mask_blur_padding={padding!r}: choose one of {', '.join(BLUR_PADDINGS)}")
    shape = maps.shape
    maps = maps.reshape(-1, 1, *shape[-2:])  # one channel per map: every map blurred alone
    half = kernel_size // 2
    if padding == "reflect":
        if min(shape[-2:]) <= half:
            raise ValueError(f"a reflect-padded {kernel_size}x{kernel_size} blur needs maps larger than {half} "
                             f"cells a side, got {shape[-2]}x{shape[-1]}: use larger images")
        return TF.gaussian_blur(maps, [kernel_size, kernel_size], [sigma, sigma]).reshape(shape)
    x = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - half
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    maps = F.conv2d(maps, k.view(1, 1, 1, -1), padding=(0, half))
    return F.conv2d(maps, k.view(1, 1, -1, 1), padding=(half, 0)).reshape(shape)


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
    """Boolean ``(..., H, W)``: the most attended cells of each map that together hold ``fraction`` of its mass.

    As the reference (DINO's attention thresholding): cells sorted ascending, the mass normalised, a cell is kept
    when the cumulative mass up to and including it exceeds ``1 - fraction`` (strictly), so the kept cells hold
    at least ``fraction`` of the mass. The comparison runs in the maps' dtype (float32 for every user), as the
    reference's, so ``1 - fraction`` rounds the same way. A map without mass keeps nothing.
    """
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    values, order = flat.sort(dim=1)
    cum = (values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)).cumsum(dim=1)
    keep_sorted = cum > (1.0 - fraction)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.view(maps.shape)


def drop_small_components(mask: torch.Tensor, min_size: int = 3) -> torch.Tensor:
    """Remove the 8-connected components of fewer than ``min_size`` cells from each ``(H, W)`` map of a boolean
    ``(..., H, W)`` mask; ``min_size=3`` drops those of at most 2 cells, as every user does.

    8-connectivity is the reference's: scikit-image's default full connectivity on a ``(1, H, W)`` map. Runs on
    the CPU (a host-device sync); the result is on the mask's device.
    """
    arr = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(arr)
    structure = np.ones((3, 3), dtype=bool)
    for idx in np.ndindex(arr.shape[:-2]):
        labels, count = ndimage.label(arr[idx], structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        big = sizes >= min_size
        big[0] = False
        out[idx] = big[labels]
    return torch.from_numpy(out).to(mask.device)


def attention_foreground(attention: torch.Tensor, fraction: float, *, blur_padding: str = "reflect",
                         kernel_size: int = 7, sigma: float = 0.6, min_size: int = 3) -> torch.Tensor:
    """``(N, heads, h, w)`` CLS-to-patch attention -> boolean ``(N, h, w)`` foreground.

    The heads' mean (a head-averaged map is ``(N, 1, h, w)``), blurred (``gaussian_blur``), the cells holding
    ``fraction`` of its mass kept (``keep_mass``), components of fewer than ``min_size`` cells removed
    (``drop_small_components``). The module docstring lists each user's parameters.
    """
    if attention.ndim != 4:
        raise ValueError(f"attention must be (N, heads, h, w), got shape {tuple(attention.shape)}")
    maps = gaussian_blur(attention.float().mean(dim=1), kernel_size, sigma, padding=blur_padding)
    return drop_small_components(keep_mass(maps, fraction), min_size)


def teacher_foreground(attention: list[torch.Tensor], blur_padding: str) -> torch.Tensor:
    """The fg/bg loss weights of ``loss.mask=fg|bg`` (METHOD.md §3.8), for training and the held-out loss alike:
    the teacher's ``(B, heads, h, w)`` attention of each of the G global crops -> float ``(G, B, 1, h, w)``."""
    fg = attention_foreground(torch.cat(attention), TRAINING_MASS_FRACTION, blur_padding=blur_padding)
    return fg.float().view(len(attention), attention[0].shape[0], 1, *attention[0].shape[-2:])
