"""What the device-dependent settings became on this run's device: run_info.json's `resolved` block and the log.

No setting needs a flag to be fast: wherever the fastest correct value depends on the device, the default picks
it, and this block records what was picked and why.

* ``device=auto``: CUDA when available, else the CPU (neco.engine.setup.resolve_device).
* ``precision=auto``: bf16 autocast for backbone and head on CUDA, fp32 elsewhere (resolve_precision).
* ``loss.sorter=auto``: the fused Triton kernels on CUDA where they run, the sparse sorter elsewhere
  (neco.loss.sorter_choice).
* AdamW: PyTorch's fused kernel on CUDA, its foreach implementation elsewhere (neco.engine.optim.build_optimizer):
  the same update up to float rounding, so there is no setting.
* attention: timm's fused ``scaled_dot_product_attention`` on every device, timm's default (the environment
  variable ``TIMM_FUSED_ATTN=0`` turns it off); the same function up to float rounding.

``compile`` stays a choice made by hand (see its comment in neco.config).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from neco.loss.sorter_choice import SorterChoice

log = logging.getLogger("neco")


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    """The implementation PyTorch runs for ``optimizer``: fused, foreach or for-loop."""
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "for-loop"


def attention_implementation(backbone: nn.Module) -> str:
    """sdpa when every attention layer calls the fused kernel, eager when none does, mixed otherwise."""
    fused = {bool(m.fused_attn) for m in backbone.modules() if hasattr(m, "fused_attn")}
    if fused == {True}:
        return "sdpa"
    return "eager" if fused == {False} else "mixed"


def resolved_block(cfg, device: torch.device, amp_dtype, sorter: SorterChoice, optimizer: torch.optim.Optimizer,
                   backbone: nn.Module) -> dict:
    """`{setting: {"requested": ..., "value": ..., "reason"?: ...}}` for every device-dependent choice."""
    on_cuda = device.type == "cuda"
    return {
        "device": {"requested": str(cfg.device), "value": str(device)},
        "precision": {"requested": str(cfg.precision),
                      "value": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"},
        "loss.sorter": sorter.record(),
        "optimizer": {"value": optimizer_implementation(optimizer),
                      "reason": "AdamW: fused on CUDA, foreach elsewhere" + ("" if on_cuda else
                                                                              f"; the run is on {device.type}")},
        "attention": {"value": attention_implementation(backbone)},
    }


def log_auto_choices(block: dict) -> None:
    """One line per setting left at `auto`, e.g. `loss.sorter=auto -> sparse (no CUDA device: the run is on cpu)`."""
    for key, entry in block.items():
        if entry.get("requested") == "auto":
            reason = f" ({entry['reason']})" if entry.get("reason") else ""
            log.info("%s=auto -> %s%s", key, entry["value"], reason)
