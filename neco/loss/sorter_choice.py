"""Which sorter a run uses: ``loss.sorter=auto`` picks the fastest one that runs on the run's device.

``triton`` (the fused kernels of :mod:`neco.loss.triton_sort`) and ``sparse`` (:func:`neco.loss.sorting.diff_sort`)
compute the same function, diffsort 0.2.0's, equal up to float rounding (tests/test_triton_sort.py); on one H200
the NeCo step at 518 px runs at 209 images/s with ``triton`` and 131 with ``sparse`` (bench/README.md). ``auto``
takes ``triton`` only where it is known to run: a CUDA device, Triton importable, a distribution with a kernel,
and a short trial of the kernels on that device agreeing with ``sparse``. Anywhere else (the CPU, MPS, no
Triton) it takes ``sparse``, exactly the path the CPU always ran, so CPU results do not move.

An explicit ``loss.sorter=triton`` where the kernels cannot run is refused before the run starts, in one line
naming the setting to use instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Optional

import torch

from neco.errors import ConfigError
from neco.loss.sorting import diff_sort

# The trial's tolerance, relative to the largest magnitude of each result: float32 rounding moves the sort's
# results by ~4e-4 of it even at steepness 1000 (gradients near 300, off by 0.1 from float64), while a wrong
# kernel (a miscompiled exchange, a wrong wire) is off by the order of the results themselves.
TRIAL_TOLERANCE = 1e-2
TRIAL_ROWS = 8


@dataclass(frozen=True)
class SorterChoice:
    requested: str
    value: str
    reason: Optional[str] = None  # why auto chose `value` (None for an explicit choice)

    def record(self) -> dict:
        """The entry of run_info.json's `resolved` block."""
        out = {"requested": self.requested, "value": self.value}
        if self.reason:
            out["reason"] = self.reason
        return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _kernels():
    """The kernel module and None, or None and why it does not import (Triton missing is not an error here)."""
    try:
        triton_sort = importlib.import_module("neco.loss.triton_sort")
    except Exception as err:  # noqa: BLE001 (a Triton that fails to import is "cannot run", whatever it raises)
        return None, f"the Triton kernels do not import ({_first_line(err)})"
    return triton_sort, None


@cache
def triton_failure(device: torch.device, network: str = "bitonic", wires: int = 49, steepness: float = 100.0,
                   distribution: str = "cauchy") -> Optional[str]:
    """Why the Triton kernels cannot sort on ``device`` here, or None when they run and agree with ``sparse``.

    The trial sorts a few float32 rows of the run's size with the run's network, steepness and distribution,
    forward and backward, so a missing Triton, an unsupported GPU or a broken compiler shows here, once per
    process, instead of in the first training step; the kernels it compiles are those the run uses.
    """
    triton_sort, reason = _kernels()
    if reason is None:
        reason = triton_sort.unavailable_reason(device)
    if reason is not None:
        return reason
    try:
        rows = torch.randn(TRIAL_ROWS, wires, generator=torch.Generator().manual_seed(0)).to(device)
        results = []
        for sort in (triton_sort.triton_diff_sort, diff_sort):
            x = rows.clone().requires_grad_()
            values, perm = sort(x, network=network, steepness=steepness, distribution=distribution)
            (grad,) = torch.autograd.grad(values.sum() + (perm * perm).sum(), x)
            results.append((values.detach(), perm.detach(), grad))
        error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) for a, b in zip(*results))
    except Exception as err:  # noqa: BLE001 (compiler and driver errors have no common type)
        return f"the Triton kernels failed on {device} ({_first_line(err)})"
    if not error <= TRIAL_TOLERANCE:  # also catches NaN
        return f"the Triton kernels disagree with the sparse sorter on {device} (relative error {error:.3g})"
    return None


def resolve_sorter(loss_cfg, device: torch.device) -> SorterChoice:
    """The sorter ``loss_cfg.sorter`` means on ``device``. Raises ConfigError for ``triton`` where it cannot run."""
    requested = str(loss_cfg.sorter)
    trial = (device, str(loss_cfg.network), loss_cfg.roi_size ** 2, float(loss_cfg.student_steepness),
             str(loss_cfg.distribution))
    if requested == "triton":
        reason = triton_failure(*trial)
        if reason is not None:
            raise ConfigError(f"loss.sorter=triton cannot run here: {reason}; set loss.sorter=auto (the fastest "
                              "sorter that runs here) or loss.sorter=sparse")
        return SorterChoice(requested, requested)
    if requested != "auto":
        return SorterChoice(requested, requested)
    if device.type != "cuda" or not torch.cuda.is_available():
        return SorterChoice(requested, "sparse", f"no CUDA device: the run is on {device.type}")
    triton_sort, reason = _kernels()
    if reason is None and loss_cfg.distribution not in triton_sort.KERNEL_DISTRIBUTIONS:
        # The kernels would hand these rows to the sparse path anyway.
        reason = f"loss.distribution={loss_cfg.distribution} has no Triton kernel"
    reason = reason or triton_failure(*trial)
    if reason is not None:
        return SorterChoice(requested, "sparse", reason)
    return SorterChoice(requested, "triton", f"CUDA device {device} and working Triton kernels")
