"""Confusion matrices, IoU and cluster-to-class matching shared by every dense evaluation (METHOD.md §6.7).

Conventions used throughout:

* A confusion matrix is indexed ``conf[gt_class, pred_id]`` and counts valid pixels (target not ignored).
  Prediction ids need not be classes: for clustering they are cluster ids, and the matrix is rectangular
  ``(num_classes, num_pred)`` until a matching turns it into a square ``(num_classes, num_classes)`` one.
* A matching is a ``LongTensor`` of length ``num_pred`` giving the class of every prediction id.
* mIoU is the mean over **all** ``num_classes`` classes; a class that is neither present nor predicted has
  IoU 0 and still counts (the reference behaviour, kept so numbers stay comparable).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "confusion_matrix",
    "iou_from_confusion",
    "hungarian_match",
    "many_to_one_match",
    "remap_confusion",
]


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_pred: int,
    num_classes: int,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Count ``(target, pred)`` pairs over the valid pixels of two same-shaped label tensors.

    Returns a ``LongTensor`` of shape ``(num_classes, num_pred)`` on the inputs' device. Pixels whose target
    is ``ignore_index`` are dropped; any other target or prediction outside its range is an error rather than
    being silently folded into a neighbouring cell by the flat bincount.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).to(pred.device).long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    # One combined reduction keeps the host/device synchronisation to a single point.
    bad = valid & ((target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_pred))
    if bool(bad.any()):
        raise ValueError(
            f"labels out of range: targets must lie in [0, {num_classes}) (or be ignore_index="
            f"{ignore_index}) and predictions in [0, {num_pred})"
        )
    # Ignored pixels are counted in one extra bin that is dropped, rather than gathered out with a mask.
    size = num_classes * num_pred
    flat = torch.where(valid, target * num_pred + pred, size)
    counts = torch.bincount(flat, minlength=size + 1)[:size]
    return counts.reshape(num_classes, num_pred)


def iou_from_confusion(conf: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Per-class IoU (float64), mIoU over all classes and pixel accuracy from a square confusion matrix."""
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(conf.shape)}")
    conf = conf.detach().to(device="cpu", dtype=torch.float64)
    tp = conf.diagonal()
    fp = conf.sum(dim=0) - tp
    fn = conf.sum(dim=1) - tp
    denom = tp + fp + fn
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.zeros_like(tp))
    total = conf.sum()
    pixel_acc = float(tp.sum() / total) if total > 0 else 0.0
    return iou, float(iou.mean()), pixel_acc


def _iou_matrix(conf: torch.Tensor) -> np.ndarray:
    """IoU between every gt class (rows) and prediction id (columns) of a rectangular confusion matrix."""
    c = conf.detach().cpu().double().numpy()
    union = c.sum(axis=1, keepdims=True) + c.sum(axis=0, keepdims=True) - c
    return np.divide(c, union, out=np.zeros_like(c), where=union > 0)


def hungarian_match(conf: torch.Tensor) -> torch.Tensor:
    """One-to-one matching of prediction ids to classes maximising the summed IoU.

    ``conf`` is ``(num_classes, num_pred)``; when there are more prediction ids than classes the unmatched ids
    are mapped to class 0 (as the reference does), when there are fewer some classes simply receive no
    prediction.
    """
    iou = _iou_matrix(conf)
    rows, cols = linear_sum_assignment(1.0 - iou)
    mapping = torch.zeros(conf.shape[1], dtype=torch.long)
    mapping[torch.as_tensor(cols, dtype=torch.long)] = torch.as_tensor(rows, dtype=torch.long)
    return mapping


def many_to_one_match(conf: torch.Tensor, criterion: str = "precision") -> torch.Tensor:
    """Map every prediction id independently to its best class (ties -> lowest class id).

    ``precision`` is the majority vote: the class holding most of the cluster's pixels. ``iou`` picks the
    class with the highest IoU against the cluster. Empty clusters go to class 0.
    """
    if criterion == "precision":
        # Integer counts, not ratios: ties are then exact and argmax returns the first (lowest) class.
        scores = conf.detach().cpu().long().numpy()
    elif criterion == "iou":
        scores = _iou_matrix(conf)
    else:
        raise ValueError(f"criterion must be 'precision' or 'iou', got {criterion!r}")
    # numpy's argmax is documented to return the first maximal index, which is the tie rule we want.
    return torch.as_tensor(np.argmax(scores, axis=0), dtype=torch.long)


def remap_confusion(conf: torch.Tensor, mapping: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Merge prediction-id columns into class columns: ``out[:, mapping[k]] += conf[:, k]``."""
    mapping = torch.as_tensor(mapping, dtype=torch.long, device=conf.device)
    if mapping.numel() != conf.shape[1]:
        raise ValueError(f"mapping has {mapping.numel()} entries for {conf.shape[1]} prediction ids")
    if mapping.numel() and (int(mapping.min()) < 0 or int(mapping.max()) >= num_classes):
        raise ValueError(f"mapping targets must lie in [0, {num_classes})")
    out = torch.zeros(conf.shape[0], num_classes, dtype=conf.dtype, device=conf.device)
    return out.index_add_(1, mapping, conf)
