"""Helpers shared by several test modules."""

import torch


@torch.no_grad()
def randomize_(module, seed=0):
    """Random values everywhere (norm scales and LayerScale around 1), so a wrong mapping shows up."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")) else 0.0
        p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))
    return module
