"""Stochastic depth as the reference's ViTs apply it (METHOD.md §2.4), on timm's blocks.

Both DINO (v1) and DINOv2 space the per-block rates linearly from 0 to ``drop_path_rate`` in float32
(``torch.linspace(...)[i].item()``), as timm does. They differ in how a block drops its residual branches:

* DINO blocks always use per-sample DropPath (a sample's branch is zeroed with probability ``rate``, the others
  are scaled by ``1 / (1 - rate)``), which is timm's ``DropPath``.
* DINOv2 blocks switch to a batch-subset form when ``rate > 0.1``: the branch is computed only for a random subset
  of ``max(int(B * (1 - rate)), 1)`` samples and added to them scaled by ``B / subset``; the others keep ``x``.
  float32(0.1) read back as a Python float is 0.10000000149 > 0.1, so at ``drop_path_rate = 0.1`` the last block
  of a DINOv2 ViT takes this path.

``backbone.drop_path_mode=reference`` reproduces that choice per block; ``per_sample`` keeps timm's DropPath in
every block.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from neco.errors import ConfigError

DROP_PATH_MODES = ("reference", "per_sample")
SUBSET_THRESHOLD = 0.1  # DINOv2: "the overhead is compensated only for a drop path rate larger than 0.1"
SUBSET_FAMILIES = ("dinov2", "tiny")  # blocks built as DINOv2's (LayerScale); DINO (v1) blocks never use it


def drop_add_residual_subset(x: torch.Tensor, residual, rate: float) -> torch.Tensor:
    """``x`` plus ``residual(x)`` for a random subset of the batch, rescaled by ``B / subset`` (DINOv2)."""
    b = x.shape[0]
    subset = max(int(b * (1 - rate)), 1)
    keep = torch.randperm(b, device=x.device)[:subset]
    branch = residual(x[keep]).flatten(1)
    out = torch.index_add(x.flatten(1), 0, keep, branch.to(x.dtype), alpha=b / subset)
    return out.view_as(x)


class SubsetDropBlock(Block):
    """A timm ``Block`` (same modules and parameter names) with DINOv2's batch-subset stochastic depth.

    The rate is read from ``drop_path1`` at every call, so setting its ``drop_prob`` to 0 (the teacher) or
    ``eval()`` gives the plain block.
    """

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        rate = float(getattr(self.drop_path1, "drop_prob", 0.0))
        if not (self.training and rate > SUBSET_THRESHOLD) or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = drop_add_residual_subset(x, lambda t: self.ls1(self.attn(self.norm1(t))), rate)
        return drop_add_residual_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))), rate)


def block_drop_rates(blocks: nn.Sequential) -> list[float]:
    """The drop-path rate of each block (0 where the block has no DropPath)."""
    return [float(getattr(blk.drop_path1, "drop_prob", 0.0)) for blk in blocks]


def apply_drop_path_mode(blocks: nn.Sequential, family: str, mode: str) -> int:
    """Give the blocks the reference's stochastic-depth form; returns how many take the batch-subset path."""
    if mode not in DROP_PATH_MODES:
        raise ConfigError(f"backbone.drop_path_mode={mode!r}: choose one of {', '.join(DROP_PATH_MODES)}")
    if mode == "per_sample" or family not in SUBSET_FAMILIES:
        return 0
    changed = 0
    for blk in blocks:
        if type(blk) is Block and isinstance(blk.drop_path1, DropPath) and blk.drop_path1.drop_prob > SUBSET_THRESHOLD:
            blk.__class__ = SubsetDropBlock  # same modules and state dict: only the forward differs
            changed += 1
    return changed
