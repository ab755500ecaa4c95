"""Community detection over cluster co-occurrences (METHOD.md §6.5.6-8): graph, Infomap, merging, tuning.

Clusters that are often spatial neighbours are likely parts of one object class. Per image, grey-level
co-occurrence counts (scikit-image's ``graycomatrix`` semantics) between the cluster ids of the 100x100 maps
are taken at distances {1, 2} in 8 directions and summed; same-cluster pairs are dropped and every row is
normalised; the rows are summed over images and divided by the number of images where the cluster has a
neighbour. Two clusters are linked when both directions reach ``weight_threshold`` (weight: the smaller one),
and Infomap's modules of that graph become the predicted segments.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from neco.eval.primitives.metrics import hungarian_match, iou_from_confusion, remap_confusion

__all__ = [
    "REFERENCE_ANGLES",
    "FIXED_ANGLES",
    "glcm_offsets",
    "cooccurrence_counts",
    "cooccurrence_matrix",
    "graph_edges",
    "infomap_modules",
    "module_lookup",
    "score_merged",
    "TrialRejected",
    "tune",
]

# The reference's 8 directions list 4*pi/3 where 5*pi/4 completes the 8-neighbourhood (METHOD.md §10.17).
REFERENCE_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi, 4 * math.pi / 3, 3 * math.pi / 2,
                    7 * math.pi / 4)
FIXED_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi, 5 * math.pi / 4, 3 * math.pi / 2,
                7 * math.pi / 4)


def _round_half_away(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def glcm_offsets(distances: Sequence[int], angles: Sequence[float]) -> list[tuple[int, int]]:
    """``(row, col)`` offset of every (distance, angle) pair, as ``graycomatrix`` rounds them (C ``round``)."""
    return [(_round_half_away(math.sin(a) * d), _round_half_away(math.cos(a) * d)) for a in angles for d in distances]


def cooccurrence_counts(labels: torch.Tensor, num_labels: int, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(B, L, L)`` int64: ``out[b, i, j]`` = number of pixel pairs (p, p + offset) with labels (i, j), summed
    over ``offsets``, for a batch of label maps ``(B, H, W)`` (``graycomatrix`` with ``symmetric=False``)."""
    b, h, w = labels.shape
    lab = labels.long()
    base = (torch.arange(b).view(b, 1, 1) * num_labels * num_labels)
    codes = []
    for dr, dc in offsets:
        r0, r1 = max(0, -dr), min(h, h - dr)
        c0, c1 = max(0, -dc), min(w, w - dc)
        if r1 <= r0 or c1 <= c0:
            continue
        i = lab[:, r0:r1, c0:c1]
        j = lab[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
        codes.append((base + i * num_labels + j).reshape(-1))
    size = b * num_labels * num_labels
    if not codes:
        return torch.zeros(b, num_labels, num_labels, dtype=torch.long)
    return torch.bincount(torch.cat(codes), minlength=size).reshape(b, num_labels, num_labels)


def cooccurrence_matrix(
    labels: torch.Tensor,
    num_labels: int,
    distances: Sequence[int] = (1, 2),
    angles: Sequence[float] = REFERENCE_ANGLES,
    chunk: int = 16,
) -> np.ndarray:
    """Row-stochastic-per-image co-occurrence ``A (L, L)`` float64 over label maps ``(N, H, W)``.

    Per image the summed counts lose their diagonal and each row is divided by its sum; ``A`` is the sum over
    images divided, row-wise, by the number of images where the row was non-zero (rows never non-zero: 0).
    """
    offsets = glcm_offsets(distances, angles)
    total = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    appearances = torch.zeros(num_labels, dtype=torch.float64)
    eye = torch.eye(num_labels, dtype=torch.bool)
    for start in range(0, labels.shape[0], chunk):
        counts = cooccurrence_counts(labels[start:start + chunk], num_labels, offsets).double()
        counts[:, eye] = 0
        row = counts.sum(dim=2, keepdim=True)
        total += torch.where(row > 0, counts / row.clamp_min(1), torch.zeros_like(counts)).sum(dim=0)
        appearances += (row[..., 0] > 0).double().sum(dim=0)
    out = torch.where(appearances[:, None] > 0, total / appearances.clamp_min(1)[:, None], torch.zeros_like(total))
    return out.numpy()


def graph_edges(adjacency: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Undirected edges ``(i, j, min(A_ij, A_ji))`` for ``i < j`` with both ``A_ij`` and ``A_ji`` >= ``threshold``.

    (The reference also visits ``i == j``; the diagonal is zero, so that only matters for thresholds <= 0.)
    """
    a = np.asarray(adjacency)
    both = (a >= threshold) & (a.T >= threshold)
    i, j = np.nonzero(np.triu(both, k=1))
    w = np.minimum(a[i, j], a[j, i])
    return [(int(x), int(y), float(z)) for x, y, z in zip(i, j, w, strict=True)]


def infomap_modules(
    edges: Sequence[tuple[int, int, float]],
    seed: int,
    markov_time: float,
    preferred_modules: int,
) -> dict[int, int]:
    """``{node: module}`` (modules numbered from 1) of an undirected two-level Infomap run on ``edges``.

    Only nodes with an edge get a module. Recent Infomap releases refuse seed 0 (the reference ran seeds 0-9
    on an older one), hence seeds from 1 in this project's defaults.
    """
    if not edges:
        return {}
    from infomap import Infomap  # imported on use: only this protocol needs it

    with warnings.catch_warnings():
        # Recent releases deprecate this keyword surface (still supported until 3.0); the older releases
        # allowed by the requirements have no other one.
        warnings.simplefilter("ignore")
        im = Infomap(directed=False, two_level=True, seed=int(seed), markov_time=float(markov_time), silent=True,
                     preferred_number_of_modules=int(preferred_modules))
        im.add_links(list(edges))
        im.run()
        return {int(n): int(m) for n, m in im.get_modules().items()}


def module_lookup(modules: dict[int, int], num_labels: int) -> torch.Tensor:
    """``(L,)`` merged id of every cluster id; clusters outside the graph get 0, as in the reference."""
    lut = torch.zeros(num_labels, dtype=torch.long)
    for node, module in modules.items():
        lut[node] = module
    return lut


def score_merged(cluster_conf: torch.Tensor, lut: torch.Tensor, num_classes: int) -> dict:
    """Hungarian-matched mIoU of merged clusters from the ``(C, L)`` class x cluster confusion matrix.

    The merged ids (``lut[cluster]``) form a rectangular ``(C, max(C, max id + 1))`` matrix: the reference's
    ``PredsmIoU(21, 21)`` instead assumes ids below 21 (METHOD.md §10.17); here every id takes part in the
    one-to-one matching and unmatched ids count as class 0 (``neco.eval.primitives.metrics.hungarian_match``).
    """
    num_pred = max(num_classes, int(lut.max()) + 1)
    conf = remap_confusion(cluster_conf, lut, num_pred)
    mapping = hungarian_match(conf)
    iou, miou, acc = iou_from_confusion(remap_confusion(conf, mapping, num_classes))
    return {"miou": miou, "pixel_acc": acc, "per_class_iou": iou.tolist(), "mapping": mapping}


class TrialRejected(AssertionError):
    """A tuning trial the reference's assertions would have failed (Optuna records it as failed)."""


def tune(
    objective: Callable[[float, float, int], float],
    trials: int,
    seed: int,
    weight_threshold_range: Sequence[float],
    markov_time_range: Sequence[float],
    k_community_range: Sequence[int],
    progress: bool = False,
):
    """Optuna TPE search maximising ``objective(weight_threshold, markov_time, k_community)``; returns the study.

    Trials run one at a time (the reference used 5 parallel jobs, which makes TPE's sequence
    non-deterministic); trials raising :class:`TrialRejected` are recorded as failed, as the reference's
    ``catch=(AssertionError,)`` does.
    """
    import optuna  # imported on use: only tuning needs it

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are counted by the caller

    def run_trial(trial):
        wt = trial.suggest_float("weight_threshold", weight_threshold_range[0], weight_threshold_range[1],
                                 step=weight_threshold_range[2])
        mt = trial.suggest_float("markov_time", markov_time_range[0], markov_time_range[1], step=markov_time_range[2])
        k = trial.suggest_int("k_community", int(k_community_range[0]), int(k_community_range[1]),
                              step=int(k_community_range[2]))
        return objective(wt, mt, k)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(run_trial, n_trials=trials, catch=(TrialRejected,), show_progress_bar=progress)
    return study
