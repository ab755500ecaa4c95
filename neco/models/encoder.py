"""Backbone + projection head applied to a list of crops of at most a few sizes (METHOD.md §2.6)."""

from __future__ import annotations

import torch
from torch import nn


class DenseEncoder(nn.Module):
    """Maps crops to unit-norm per-token embeddings arranged as `(B, d, S, S)` maps, one per crop.

    Consecutive crops of the same size go through the backbone together (globals, then locals), which is
    what the reference does and keeps the number of backbone calls at two per step.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], with_attention: bool = False):
        maps, attention = [], []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(crops[start:end])
            if with_attention:
                tokens, attn = self.backbone.forward_with_attention(x)
                attention.extend(attn.chunk(end - start))
            else:
                tokens = self.backbone(x)  # (n*B, h, w, D) final-norm patch tokens
            z = self.head(tokens).permute(0, 3, 1, 2)  # (n*B, d, h, w)
            maps.extend(z.chunk(end - start))
            start = end
        return (maps, attention) if with_attention else maps
