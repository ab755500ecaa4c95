"""Parameter groups, trainable blocks, and step-indexed schedules for lr, weight decay and EMA momentum
(METHOD.md §4)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from neco.errors import ConfigError

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Parameters the reference decays because they are >= 2-D (METHOD.md §4.1, §10.24); optim.decay_tokens=false
# spares them.
TOKEN_PARAMS = ("cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token")
# What a step whose loss is exactly zero does to the step counter that indexes the schedules (METHOD.md §4.8).
ZERO_LOSS_STEPS = ("advance", "hold")


def block_index(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def select_trainable_blocks(backbone: nn.Module, trainable_blocks) -> list[str]:
    """Freeze every backbone parameter outside the selected blocks (METHOD.md §4.5); returns the frozen names.

    `None` trains everything; an int n selects `sorted(blocks)[n:]` (negative n: the last |n| blocks);
    a list selects those block ids. Patch embedding, tokens, position embedding and final norm are frozen
    whenever a selection is given.
    """
    if trainable_blocks is None:
        return []
    named = list(backbone.named_parameters())
    ids = sorted({b for b in (block_index(n) for n, _ in named) if b is not None})
    if isinstance(trainable_blocks, int):
        selected = set(ids[trainable_blocks:])
    else:
        selected = {int(b) for b in trainable_blocks}
        unknown = selected - set(ids)
        if unknown:
            raise ConfigError(f"optim.trainable_blocks: blocks {sorted(unknown)} do not exist (blocks 0..{ids[-1]})")
    frozen = []
    for name, param in named:
        if block_index(name) not in selected:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _decayed(name: str, param: nn.Parameter, decay_tokens: bool) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    if not decay_tokens and name.split(".")[-1] in TOKEN_PARAMS:
        return False
    return True


def param_groups(backbone: nn.Module, head: nn.Module, cfg) -> list[dict]:
    """The reference's four AdamW groups in order: backbone decayed / not, head decayed / not (METHOD.md §4.1).

    Each group carries `name` and `decay` (whether the weight-decay schedule is written into it).
    """
    groups = []
    for part, module, lr in (("backbone", backbone, cfg.lr_backbone), ("head", head, cfg.lr_heads)):
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if cfg.exclude_norm_bias and not _decayed(name, param, cfg.decay_tokens):
                no_decay.append(param)
            else:
                decay.append(param)
        groups.append({"name": f"{part}_decay", "params": decay, "lr": lr, "base_lr": lr, "decay": True})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "base_lr": lr,
                       "weight_decay": 0.0, "decay": False})
    return [g for g in groups if g["params"]]


def cosine(start: float, end: float, total: int) -> np.ndarray:
    """`end + (start - end) * (1 + cos(pi t / T)) / 2` for t = 0 .. T-1 (METHOD.md §4.2-4.4)."""
    t = np.arange(total, dtype=np.float64)
    return end + 0.5 * (start - end) * (1.0 + np.cos(math.pi * t / total))


@dataclass
class Schedules:
    """Step-indexed arrays; index = number of completed optimizer steps."""

    lr_scale: np.ndarray  # multiplies each group's base lr (cosine 1 -> final_lr / lr, per group below)
    weight_decay: np.ndarray
    momentum: np.ndarray
    final_lr: float

    def lr(self, base_lr: float, step: int) -> float:
        # Cosine from the group's base lr to final_lr (0 in every config).
        return self.final_lr + (base_lr - self.final_lr) * float(self.lr_scale[step])

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Write lr(t) into every group and wd(t) into the decayed groups, right before the step."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["base_lr"], step)
            if group.get("decay"):
                group["weight_decay"] = float(self.weight_decay[step])


def build_schedules(cfg, total_steps: int) -> Schedules:
    if cfg.zero_loss_step not in ZERO_LOSS_STEPS:
        raise ConfigError(f"optim.zero_loss_step={cfg.zero_loss_step!r}: choose one of {', '.join(ZERO_LOSS_STEPS)}")
    if total_steps <= 0:
        raise ConfigError("the run has no optimizer steps: the dataset is smaller than one batch "
                         "(lower data.batch_size or optim.accumulate, or use more images)")
    return Schedules(
        lr_scale=cosine(1.0, 0.0, total_steps),
        weight_decay=cosine(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        momentum=cosine(cfg.momentum_teacher, cfg.momentum_teacher_end, total_steps),
        final_lr=cfg.final_lr,
    )


def build_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel exists for CUDA tensors; on the CPU the foreach implementation is the fast one.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr_backbone, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=None if fused else True)
