"""The NeCo objective: differentiable sorting, per-pair permutation cross-entropy, and the full step loss."""

from neco.loss.neco import NeCoLoss
from neco.loss.pair import pair_loss
from neco.loss.sorting import diff_sort

__all__ = ["NeCoLoss", "diff_sort", "pair_loss"]
