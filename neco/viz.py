"""PNG figures for runs and evaluations: multi-crop boxes, segmentations, feature PCA and training curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly instead of ``pyplot``: that
needs no display, leaves the process-wide backend alone for whoever imports this, and never accumulates open
figures in a long training run.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

__all__ = [
    "denormalize",
    "label_palette",
    "colorize_labels",
    "save_crops_figure",
    "save_segmentation_figure",
    "save_feature_pca_figure",
    "plot_metrics",
    "save_comparison_figure",
]

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_IGNORE_COLOR = (0, 0, 0)
_OUT_OF_RANGE_COLOR = (128, 128, 128)
_MAX_LEGEND = 40  # classes listed under a segmentation figure (those that appear in it, lowest ids first)
# Distinct, fixed colours for the crops (matplotlib's "tab10"; index = crop id).
_CROP_COLORS = [to_hex(c) for c in colormaps["tab10"].colors]


def denormalize(img: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised ``(3, H, W)`` tensor -> ``(H, W, 3)`` uint8 array."""
    x = img.detach().float().cpu() * _STD + _MEAN
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def label_palette(num_classes: int) -> np.ndarray:
    """Fixed ``(num_classes, 3)`` uint8 palette: the 20 "tab20" colours, then evenly spread golden-ratio hues.

    None of the colours is black, which is reserved for ignore pixels.
    """
    tab20 = [tuple(int(round(255 * v)) for v in c) for c in colormaps["tab20"].colors]
    # tab20 pairs a dark and a light shade of each hue; the dark ones first keeps low class ids far apart.
    tab20 = tab20[0::2] + tab20[1::2]
    colors = list(tab20[:num_classes])
    for i in range(len(colors), num_classes):
        hue = (i * 0.618033988749895) % 1.0
        sat, val = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.7)
        colors.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val)))
    return np.asarray(colors, dtype=np.uint8).reshape(num_classes, 3)


def colorize_labels(labels: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """``(H, W)`` label map -> ``(H, W, 3)`` uint8; ignore pixels black, other out-of-range ids grey."""
    lab = torch.as_tensor(labels).detach().cpu().long().numpy()
    palette = label_palette(num_classes)
    out = np.empty((*lab.shape, 3), dtype=np.uint8)
    out[:] = _OUT_OF_RANGE_COLOR
    inside = (lab >= 0) & (lab < num_classes)
    out[inside] = palette[lab[inside]]
    if ignore_index is not None:
        out[lab == ignore_index] = _IGNORE_COLOR
    return out


def _as_image(img) -> np.ndarray:
    """Accept a normalised tensor ``(3, H, W)`` or an ``(H, W, 3)`` uint8 array."""
    if isinstance(img, torch.Tensor):
        return denormalize(img)
    return np.asarray(img)


def _crop_color(i: int) -> str:
    return _CROP_COLORS[i % len(_CROP_COLORS)]


def save_crops_figure(
    crops: Sequence[torch.Tensor],
    boxes: Mapping[str, torch.Tensor],
    path,
    title: str | None = None,
) -> Path:
    """Show one image's multi-crop, each crop at its own relative size, with the regions each pair aligns.

    ``boxes["all"][j, g]`` is the overlap of crop ``j`` with global crop ``g`` in crop ``j``'s frame (METHOD.md
    §1.4): it is drawn solid, in global crop ``g``'s colour. On each global crop ``g`` the regions of the
    local crops (``boxes["gc"][g, j]``) are drawn dashed in crop ``j``'s colour, so both ends of every aligned
    pair are visible.
    """
    all_boxes = torch.as_tensor(boxes["all"]).detach().cpu().float()
    gc_boxes = torch.as_tensor(boxes["gc"]).detach().cpu().float() if "gc" in boxes else None
    n_crops, n_global = all_boxes.shape[0], all_boxes.shape[1]
    if len(crops) != n_crops:
        raise ValueError(f"{len(crops)} crops but boxes['all'] describes {n_crops}")
    images = [_as_image(c) for c in crops]
    widths = [im.shape[1] for im in images]
    largest = max(max(im.shape[:2]) for im in images)
    fig_w = max(4.0, 3.0 * sum(widths) / largest)
    fig = Figure(figsize=(fig_w, 3.6 if title else 3.3), layout="constrained")
    axes = fig.subplots(1, n_crops, width_ratios=widths, squeeze=False)[0]
    for j, (ax, im) in enumerate(zip(axes, images, strict=True)):
        h, w = im.shape[:2]
        # Extent in continuous pixel units so boxes (pixel k spans [k, k+1)) land exactly.
        ax.imshow(im, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_ylim(largest, 0)  # same vertical scale in every panel, so crop sizes compare at a glance
        ax.set_xlim(0, w)
        kind = f"global {j}" if j < n_global else f"local {j - n_global}"
        ax.set_title(f"{kind} ({w}x{h})", fontsize=8, color=_crop_color(j))
        ax.axis("off")
        for g in range(n_global):
            if g == j:
                continue
            x1, y1, x2, y2 = all_boxes[j, g].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2.0, ec=_crop_color(g)))
        if gc_boxes is not None and j < n_global:
            for other in range(n_global, n_crops):
                x1, y1, x2, y2 = gc_boxes[j, other].tolist()
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ls="--", ec=_crop_color(other))
                )
                ax.text(x1 + 2, y1 + 2, str(other), color=_crop_color(other), fontsize=7, va="top")
    legend = [Line2D([], [], color="black", lw=2.0, label="solid box on crop j, in global crop g's colour: the "
                      "part of crop j that crop g also shows (the pair (j, g) is aligned there)")]
    if gc_boxes is not None:
        legend.append(Line2D([], [], color="black", lw=1.2, ls="--", label="dashed box n on a global crop, in "
                             "local crop n's colour: where local crop n lies in it"))
    fig.legend(handles=legend, loc="outside lower center", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def classes_shown(label_maps, num_classes: int, ignore_index: int | None = 255,
                  limit: int = _MAX_LEGEND) -> tuple[list[int], bool]:
    """The class ids (at most ``limit``, lowest first) that appear in ``label_maps``, and whether ignore does."""
    shown = set()
    for labels in label_maps:
        shown.update(torch.unique(torch.as_tensor(labels).detach().cpu()).tolist())
    classes = sorted(c for c in shown if 0 <= c < num_classes and c != ignore_index)[:limit]
    return classes, ignore_index is not None and ignore_index in shown


def save_segmentation_figure(
    images,
    masks,
    predictions: Mapping[str, torch.Tensor],
    path,
    num_classes: int,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Grid with one row per image: image | ground truth | one column per prediction (fixed palette).

    The column titles are the keys of ``predictions`` (put each method's score there). A legend gives the colour
    of every class that appears in the figure, by name with ``class_names`` (else by id).
    """
    n = len(images)
    cols = 2 + len(predictions)
    fig = Figure(figsize=(2.0 * cols, 2.0 * n + 0.8 + (0.3 if title else 0)), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    titles = ["image", "ground truth", *predictions.keys()]
    for i in range(n):
        panels = [_as_image(images[i]), colorize_labels(masks[i], num_classes, ignore_index)]
        panels += [colorize_labels(p[i], num_classes, ignore_index) for p in predictions.values()]
        for c, (ax, panel) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(panel, interpolation="nearest")
            ax.axis("off")
            if i == 0:
                ax.set_title(titles[c], fontsize=9)
    maps = [*masks[:n], *(p[i] for p in predictions.values() for i in range(n))]
    classes, ignored = classes_shown(maps, num_classes, ignore_index)
    palette = label_palette(num_classes) / 255.0
    handles = [Patch(color=palette[c], label=class_names[c] if class_names else f"class {c}") for c in classes]
    if ignored:
        handles.append(Patch(color=np.asarray(_IGNORE_COLOR) / 255.0, label="ignored"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _pca_rgb(feats: torch.Tensor) -> np.ndarray:
    """Project ``(N, h, w, D)`` features on their top-3 principal components, each scaled to [0, 1]."""
    n, h, w, d = feats.shape
    x = feats.detach().cpu().double().reshape(-1, d)
    x = x - x.mean(dim=0)
    # Exact eigendecomposition of the small (D x D) scatter matrix: cheap for the few images shown and
    # deterministic, unlike randomised PCA.
    _, vecs = torch.linalg.eigh(x.T @ x)
    comps = vecs[:, -3:].flip(1)  # eigh sorts ascending
    proj = x @ comps
    if proj.shape[1] < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], dim=1)
    # Robust per-component range: a few outlier tokens (e.g. high-norm artefacts) would wash out the colours.
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return rgb.reshape(n, h, w, 3).float().numpy()


def save_feature_pca_figure(images, feats: torch.Tensor, path) -> Path:
    """Each image beside the RGB rendering of its patch features' top-3 PCA components (fitted jointly)."""
    rgb = _pca_rgb(torch.as_tensor(feats))
    n = rgb.shape[0]
    fig = Figure(figsize=(4.4, 2.1 * n + 0.3), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_as_image(images[i]))
        axes[i, 1].imshow(rgb[i], interpolation="nearest")
        for ax in axes[i]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("feature PCA (1-3)", fontsize=9)
    return _save(fig, path)


def _read_jsonl(path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a truncated last line; the rest is still worth plotting
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(rec["step"])
            values.append(float(v))
    return steps, values


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): the trend of a noisy curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_metrics(metrics_jsonl_path, out_path, keys: Sequence[str] = ("loss",), title: str | None = None,
                 smoothing: float = 0.8) -> Path:
    """Plot ``keys`` (a panel each) against ``step`` from a run's ``metrics.jsonl``, and ``lr`` if logged.

    Each curve is drawn raw (light) and smoothed (``smoothing``: the weight of the moving average, 0 = none).
    """
    records = _read_jsonl(metrics_jsonl_path)
    panels = list(keys)
    if "lr" not in panels and _series(records, "lr")[0]:
        panels.append("lr")
    fig = Figure(figsize=(5.0, 2.2 * len(panels) + 0.3 + (0.3 if title else 0)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, key in zip(axes, panels, strict=True):
        steps, values = _series(records, key)
        if steps:
            if smoothing > 0 and len(values) > 2:
                ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0", label="logged")
                ax.plot(steps, smooth(values, smoothing), lw=1.6, color="C0", label=f"smoothed (EMA {smoothing})")
                ax.legend(fontsize=7, frameon=False)
            else:
                ax.plot(steps, values, lw=1.2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path=out_path)


def save_comparison_figure(columns: Mapping[str, Mapping[str, float]], path, metrics: Sequence[str] | None = None
                           ) -> Path:
    """One panel per metric: a bar per model (``columns``: {model label: {metric: value}}), value written on it,
    with the spread over seeds (``<metric>_std``) as an error bar where recorded.

    ``metrics``: which to show (default: every metric whose name ends in ``miou``, else all)."""
    labels = list(columns)
    every = list(dict.fromkeys(m for c in columns.values() for m in c))
    metrics = list(metrics) if metrics is not None else ([m for m in every if m.endswith("miou")] or every)
    ncols = min(4, max(1, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(3.0 * ncols, 2.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [_crop_color(i) for i in range(len(labels))]
    for ax, metric in zip(axes, metrics):
        values = [columns[label].get(metric, float("nan")) for label in labels]
        spread = [columns[label].get(f"{metric}_std", 0.0) for label in labels]  # over seeds, where recorded
        bars = ax.bar(range(len(labels)), values, color=colors, yerr=spread if any(spread) else None, capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(labels), fontsize=10)
    return _save(fig, path)
