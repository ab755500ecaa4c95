"""What post-training changed in the features, shown where a person sees it: query-patch similarity maps.

For a few query patches (one per image, at the centre of its largest object), the cosine similarity of the
query's feature to every patch of its image, before and after, and their difference. The number in each panel,
the *ranking AUC*, is the chance that a patch of the query's own class is more similar to the query than a
patch of another class: NeCo trains the ordering of each patch's neighbours, and this is the part of the
ordering a segmentation relies on. It ignores a shift of all similarities together, which the difference
panel shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from neco.viz import Figure, _as_image, _save, colorize_labels, label_palette


@dataclass
class Query:
    image: int  # index into the images given
    row: int  # patch row and column
    col: int
    label: int  # class of the query patch


def patch_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, S, S)`` masks -> ``(N, h, w)`` labels sampled at the patch centres."""
    h, w = grid
    size_h, size_w = masks.shape[-2:]
    rows = ((torch.arange(h) + 0.5) * size_h / h).long().clamp_max(size_h - 1)
    cols = ((torch.arange(w) + 0.5) * size_w / w).long().clamp_max(size_w - 1)
    return masks[:, rows][:, :, cols]


def pick_queries(labels: torch.Tensor, background: int = 0, ignore_index: int | None = 255) -> list[Query]:
    """One query per image: the patch nearest the centroid of the image's largest non-background class."""
    queries = []
    for i, lab in enumerate(labels):
        ids, counts = torch.unique(lab, return_counts=True)
        keep = (ids != background) & (ids != (ignore_index if ignore_index is not None else -1))
        if not keep.any():
            continue
        cls = int(ids[keep][counts[keep].argmax()])
        ys, xs = torch.nonzero(lab == cls, as_tuple=True)
        d = (ys.float() - ys.float().mean()) ** 2 + (xs.float() - xs.float().mean()) ** 2
        j = int(d.argmin())
        queries.append(Query(i, int(ys[j]), int(xs[j]), cls))
    return queries


def similarity_maps(feats: torch.Tensor, queries: Sequence[Query]) -> torch.Tensor:
    """``(N, h, w, D)`` features -> ``(Q, h, w)`` cosine similarity of each query to its image's patches."""
    maps = []
    for q in queries:
        f = F.normalize(feats[q.image].float(), dim=-1)
        maps.append(f @ f[q.row, q.col])
    return torch.stack(maps)


def class_ranking_auc(sim: torch.Tensor, labels: torch.Tensor, query: Query) -> float:
    """P(a patch of the query's class is more similar to the query than a patch of another class); ties count
    half. The query itself is left out; NaN when the image has no patch of either kind."""
    same = labels == query.label
    same[query.row, query.col] = False
    other = labels != query.label
    if not same.any() or not other.any():
        return float("nan")
    a, b = sim[same].double()[:, None], sim[other].double()[None, :]
    return float((a > b).double().mean() + 0.5 * (a == b).double().mean())


def save_similarity_figure(images, labels: torch.Tensor, queries: Sequence[Query], before: torch.Tensor,
                           after: torch.Tensor, path, patch_size: int, class_names: Sequence[str],
                           ignore_index: int | None = 255, after_name: str = "after NeCo") -> tuple[str, list]:
    """Rows: image with the query | its class map | similarity before | after | after - before.

    Returns the path and the per-query ranking AUCs ``[(before, after), ...]``.
    """
    n = len(queries)
    num_classes = len(class_names)
    fig = Figure(figsize=(12.5, 2.5 * n + 1.2), layout="constrained")
    axes = fig.subplots(n, 5, squeeze=False)
    limit = float(max((after - before).abs().max(), 1e-6))
    aucs = []
    for r, q in enumerate(queries):
        image = _as_image(images[q.image])
        box = Rectangle((q.col * patch_size, q.row * patch_size), patch_size, patch_size, fill=False, lw=2, ec="red")
        axes[r, 0].imshow(image)
        axes[r, 0].add_patch(box)
        axes[r, 0].set_title(f"query: {class_names[q.label]}", fontsize=9)
        lab = labels[q.image]
        axes[r, 1].imshow(colorize_labels(lab, num_classes, ignore_index), interpolation="nearest")
        axes[r, 1].add_patch(Rectangle((q.col - 0.5, q.row - 0.5), 1, 1, fill=False, lw=2, ec="red"))
        axes[r, 1].set_title("classes (patch grid)", fontsize=9)
        pair = (class_ranking_auc(before[r], lab, q), class_ranking_auc(after[r], lab, q))
        aucs.append(pair)
        lo = float(min(before[r].min(), after[r].min()))
        for c, (sim, name, value) in enumerate(((before[r], "before", pair[0]), (after[r], after_name, pair[1]))):
            im = axes[r, 2 + c].imshow(sim.numpy(), cmap="viridis", vmin=lo, vmax=1.0, interpolation="nearest")
            axes[r, 2 + c].set_title(f"{name}: ranking AUC {value:.3f}", fontsize=9)
        fig.colorbar(im, ax=axes[r, 2:4], shrink=0.85, label="cosine similarity")
        diff = axes[r, 4].imshow((after[r] - before[r]).numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit,
                                 interpolation="nearest")
        axes[r, 4].set_title(f"after - before (AUC {pair[1] - pair[0]:+.3f})", fontsize=9)
        fig.colorbar(diff, ax=axes[r, 4], shrink=0.85, label="change in similarity")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    palette = label_palette(num_classes) / 255.0
    handles = [Patch(color=palette[i], label=name) for i, name in enumerate(class_names)]
    handles.append(Line2D([], [], color="red", lw=2, label="query patch"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle("Similarity of a query patch to every patch of its image, before and after post-training\n"
                 "ranking AUC = chance that a patch of the query's class is more similar to the query than a "
                 "patch of another class (1: perfect order, 0.5: chance)", fontsize=10)
    return str(_save(fig, path)), aucs
