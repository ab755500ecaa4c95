"""Scoring cluster assignments against ground-truth masks: the overclustering protocol and the in-training k-means
monitor (METHOD.md §6.1, §6.2, matching as §6.7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neco.eval.primitives.labels import LEGACY_NEAREST, tokens_to_mask
from neco.eval.primitives.metrics import (
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    many_to_one_match,
    remap_confusion,
)

__all__ = ["resolve_ks", "cluster_confusion", "score_clusters"]


def resolve_ks(ks: Sequence, num_classes: int) -> list[int]:
    """``ks`` entries are ints or the string ``"classes"`` (the dataset's number of classes)."""
    out = []
    for k in ks:
        value = num_classes if k == "classes" else k
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ks entries must be positive ints or 'classes', got {k!r}")
        out.append(int(value))
    return out


def cluster_confusion(
    assign: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    num_classes: int,
    ignore_index: int | None,
    image_size: int | None = None,
    chunk: int = 64,
    label_resize: str = LEGACY_NEAREST,
) -> torch.Tensor:
    """``conf[class, cluster]`` over the valid pixels of ``(N, m, m)`` masks.

    ``assign`` holds cluster ids per token ``(N, g, g)`` (brought to the masks by
    :func:`neco.eval.primitives.labels.tokens_to_mask` with ``label_resize``, which needs the input ``image_size``)
    or already per mask pixel ``(N, m, m)``.
    """
    conf = torch.zeros(num_classes, k, dtype=torch.long)
    for start in range(0, assign.shape[0], chunk):
        a = assign[start : start + chunk]
        m = masks[start : start + chunk].long()
        if a.shape[-2:] != m.shape[-2:]:
            if image_size is None:
                raise ValueError("token-resolution clusters need image_size to be aligned with the masks")
            a = tokens_to_mask(a, image_size, m.shape[-1], label_resize)
        conf += confusion_matrix(a, m, k, num_classes, ignore_index)
    return conf


def score_clusters(
    conf: torch.Tensor,
    criterion: str,
    exclude_class: int | None = None,
    background: int = 0,
) -> dict:
    """Match clusters to classes and score them (METHOD.md §6.7).

    ``criterion``: ``hungarian`` (one-to-one on IoU, unmatched clusters -> class 0), ``precision`` or ``iou``
    (many-to-one). ``exclude_class``: a class id left out of the mIoU average (ADE20K's ignored label 0, spec
    §10.14); the matching itself is unchanged. Returns the mapping, per-class IoU / precision / recall
    (fractions), ``miou`` and ``pixel_acc`` in percent, and the fraction of clusters mapped to ``background``.
    """
    num_classes = conf.shape[0]
    if criterion == "hungarian":
        mapping = hungarian_match(conf)
    elif criterion in ("precision", "iou"):
        mapping = many_to_one_match(conf, criterion)
    else:
        raise ValueError(f"criterion must be hungarian, precision or iou, got {criterion!r}")
    square = remap_confusion(conf, mapping, num_classes).double()
    iou, miou, acc = iou_from_confusion(square)
    if exclude_class is not None and 0 <= exclude_class < num_classes:
        keep = torch.ones(num_classes, dtype=torch.bool)
        keep[exclude_class] = False
        miou = float(iou[keep].mean())
    tp = square.diagonal()
    # max(., 1e-8) as the reference: a class never predicted (or never present) scores 0, not NaN.
    precision = tp / square.sum(dim=0).clamp_min(1e-8)
    recall = tp / square.sum(dim=1).clamp_min(1e-8)
    return {
        "mapping": mapping,
        "miou": 100.0 * miou,
        "pixel_acc": 100.0 * acc,
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "bg_fraction": float((mapping == background).double().mean()),
    }
