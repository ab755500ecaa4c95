"""Exponential moving average of the student into the teacher (METHOD.md §4.4)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """`teacher <- m * teacher + (1 - m) * student` for every parameter pair, in one fused call per op.

    Frozen student parameters (optim.trainable_blocks) are averaged too, as the reference does.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student must have the same architecture for the EMA update")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
