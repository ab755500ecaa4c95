"""Monitors the trainer runs during training: the k-means monitor (METHOD.md §6.1) and the attention maps
(METHOD.md §6.6).

Selected with ``monitor=kmeans`` or ``monitor=attention`` (options in ``MonitorConfig``), they are called as
``monitor(backbone, tag) -> {name: float}`` before/after training and every ``every_n_epochs`` epochs or
``every_n_steps`` steps; the trainer logs the values as ``eval/<tag>/<name>``. IoU-type numbers (mIoU, pixel
accuracy, Jaccard) are in percent, the rest (precision, recall, fraction of clusters) are fractions.

The k-means monitor differs from the overclustering protocol (neco.eval.overcluster.protocol) on purpose, as in the
reference: features are upsampled bilinearly to the mask size before clustering (not clustered per token),
standardised with ``(x - mean) / (std + 1e-5)``, and k-means runs 50 iterations with seed 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from neco.errors import ConfigError
from neco.eval.primitives.cluster_scoring import cluster_confusion, resolve_ks, score_clusters
from neco.eval.primitives.features import FeatureExtractor, normalize, resize_image
from neco.eval.primitives.kmeans import faiss_threads, kmeans_assign
from neco.eval.primitives.labels import LEGACY_NEAREST, resize_label_map, resize_mask
from neco.eval.primitives.pca import standardise_and_project
from neco.loss.masks import attention_foreground, keep_mass

log = logging.getLogger("neco")

MONITORS = ("kmeans", "attention")
# (x - mean) / (std + 1e-5) as the reference monitor (METHOD.md §6.1); the rest as neco.eval.primitives.pca notes.
MONITOR_PCA = dict(constant_dims="eps", eps=1e-5, precision="float32")


# ------------------------------------------------------------------------------------------ k-means monitor

def _upsampled_chunks(feats: torch.Tensor, size: int, device: torch.device | str = "cpu"):
    """Chunk source of bilinearly upsampled features: ``(N, h, w, D)`` -> rows of ``N * size * size`` pixels."""
    per_chunk = max(1, 100_000 // (size * size))  # about the standardiser's 100k rows

    def chunks():
        for start in range(0, feats.shape[0], per_chunk):
            x = feats[start : start + per_chunk].to(device).float().permute(0, 3, 1, 2)
            # align_corners=False: the reference's nn.functional.interpolate(mode="bilinear") default.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            yield x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).cpu().numpy()

    return chunks


def kmeans_monitor_metrics(
    feats: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    ks,
    *,
    class_names=None,
    pca_dim: int | None = 50,
    pca_max_points: int | None = 4_000_000,
    niter: int = 50,
    nredo: int = 5,
    seed: int = 1,
    per_class: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
    """METHOD.md §6.1 on ``(N, h, w, D)`` features and ``(N, m, m)`` masks.

    Returns the flat metrics (``k<K>/miou``, ``k<K>/pixel_acc``, per class ``k<K>/class/<name>/precision``
    and ``.../recall``; for K other than the number of classes the precision-based many-to-one matching under
    ``k<K>/`` with ``k<K>/bg_fraction``, and the IoU-based one under ``k<K>_iou/``) and, per K, the matched
    class map of every pixel ``(N, m, m)`` (for figures).
    """
    n, m = feats.shape[0], masks.shape[-1]
    names = list(class_names or [str(c) for c in range(num_classes)])
    x = standardise_and_project(_upsampled_chunks(feats, m, device), n * m * m, feats.shape[-1], pca_dim,
                                pca_max_points=pca_max_points, **MONITOR_PCA)
    metrics, preds = {}, {}
    for k in dict.fromkeys(resolve_ks(ks, num_classes)):
        assign, _ = kmeans_assign(x, k, niter=niter, nredo=nredo, seed=seed)
        assign = torch.from_numpy(assign).view(n, m, m)
        conf = cluster_confusion(assign, masks, k, num_classes, ignore_index)
        for criterion in ["hungarian"] if k == num_classes else ["precision", "iou"]:
            prefix = f"k{k}_iou" if criterion == "iou" else f"k{k}"
            score = score_clusters(conf, criterion)
            metrics[f"{prefix}/miou"] = score["miou"]
            metrics[f"{prefix}/pixel_acc"] = score["pixel_acc"]
            if criterion != "hungarian":
                metrics[f"{prefix}/bg_fraction"] = score["bg_fraction"]
            if per_class:
                for c, name in enumerate(names):
                    metrics[f"{prefix}/class/{name}/precision"] = score["precision"][c]
                    metrics[f"{prefix}/class/{name}/recall"] = score["recall"][c]
            if criterion != "iou":
                preds[k] = score["mapping"][assign]
    return metrics, preds


class KMeansMonitor:
    """The in-training k-means monitor (METHOD.md §6.1) on the first ``max_images`` images of a dataset split."""

    model = "student"  # which network the trainer hands over: the reference monitors the student

    def __init__(self, dataset, *, image_size: int = 448, mask_size: int = 100, ks=(500, 300, "classes"),
                 max_images: int | None = None, pca_dim: int | None = 50, pca_max_points: int | None = 4_000_000,
                 iters: int = 50, restarts: int = 5, seed: int = 1, per_class: bool = True,
                 threads: int | None = None, device="cpu", amp_dtype=None, batch_size: int = 32,
                 progress: bool = False, figure_dir: str | Path | None = None, num_figures: int = 0):
        resolve_ks(ks, dataset.num_classes)  # a bad entry fails now, not after the first epoch
        self.dataset, self.image_size, self.mask_size, self.ks = dataset, image_size, mask_size, list(ks)
        self.indices = list(range(len(dataset) if max_images is None else min(max_images, len(dataset))))
        self.kmeans = dict(pca_dim=pca_dim, pca_max_points=pca_max_points, niter=iters, nredo=restarts, seed=seed,
                           per_class=per_class)
        self.threads, self.device, self.amp_dtype = threads, torch.device(device), amp_dtype
        self.batch_size, self.progress = batch_size, progress
        self.figure_dir, self.num_figures = figure_dir, num_figures

    def __call__(self, backbone: torch.nn.Module, tag: str) -> dict[str, float]:
        # No cache: the weights change between calls.
        extractor = FeatureExtractor(backbone, device=self.device, amp_dtype=self.amp_dtype,
                                     batch_size=self.batch_size, progress=self.progress)
        feats, masks = extractor.extract(self.dataset, self.image_size, self.mask_size, indices=self.indices,
                                         desc="k-means monitor features")
        ds = self.dataset
        with faiss_threads(self.threads):
            metrics, preds = kmeans_monitor_metrics(
                feats, masks, ds.num_classes, ds.ignore_index, self.ks, class_names=getattr(ds, "class_names", None),
                device=self.device, **self.kmeans)
        if self.figure_dir is not None and self.num_figures > 0:
            n = min(self.num_figures, len(self.indices))
            _segmentation_figure(ds, n, self.image_size, masks[:n].long(),
                                 {f"k-means K={k}": p[:n] for k, p in preds.items()},
                                 Path(self.figure_dir) / f"kmeans_monitor_{tag}.png", ds.num_classes, ds.ignore_index)
        return {f"kmeans/{k}": float(v) for k, v in metrics.items()}


def _segmentation_figure(dataset, n, image_size, masks, preds, path, num_classes, ignore_index) -> None:
    from neco.viz import save_segmentation_figure  # matplotlib only when a figure is asked for

    images = [resize_image(dataset[i][0], image_size) for i in range(n)]
    save_segmentation_figure(images, masks, preds, path, num_classes=num_classes, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------- attention monitor

def _jaccard(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-map IoU of boolean maps over the valid pixels (last two dims); an empty union scores 0."""
    inter = (pred & target & valid).sum(dim=(-2, -1)).double()
    union = ((pred | target) & valid).sum(dim=(-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def attention_jaccards(
    attention: torch.Tensor,
    masks: torch.Tensor,
    ignore_index: int | None = 255,
    threshold: float = 0.6,
    boundary_as_foreground: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image Jaccard of thresholded CLS attention ``(B, heads, h, w)`` against ``(B, S, S)`` masks.

    Merged: the heads' mean, blurred, ``threshold`` of its mass kept, components of <= 2 cells removed,
    against the foreground (label != 0). Best head: every head thresholded alone (no blur, no clean-up); per
    object class in the image (labels other than 0 and the ignore label) the best head's Jaccard, averaged
    over the image's objects (0 for an image without objects). Pixels labelled ``ignore_index`` are left out
    unless ``boundary_as_foreground``, which counts them as foreground as the reference callback did.
    Returns ``(merged (B,), best_head (B,), merged foreground masks (B, S, S))``.
    """
    b = attention.shape[0]
    size = masks.shape[-2:]
    masks = masks.long()
    attention = attention.float()
    merged = attention_foreground(attention, threshold)  # METHOD.md §6.6: reflect blur
    # Token maps onto the masks with torch's nearest, as the reference callback.
    merged = resize_label_map(merged, tuple(size), LEGACY_NEAREST)
    per_head = resize_label_map(keep_mass(attention, threshold), tuple(size), LEGACY_NEAREST)  # each head alone
    if boundary_as_foreground or ignore_index is None:
        valid = torch.ones_like(masks, dtype=torch.bool)
    else:
        valid = masks != ignore_index
    merged_jac = _jaccard(merged, masks != 0, valid)
    best = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        objects = [int(o) for o in masks[i].unique() if int(o) != 0 and int(o) != ignore_index]
        if objects:
            scores = [_jaccard(per_head[i], (masks[i] == o)[None], valid[i][None]).max() for o in objects]
            best[i] = torch.stack(scores).mean()
    return merged_jac, best, merged


class AttentionMonitor:
    """Jaccard of the teacher's thresholded CLS attention against the foreground (METHOD.md §6.6)."""

    model = "teacher"  # the attention the fg/bg loss variants use is the teacher's

    def __init__(self, dataset, *, image_size: int = 448, max_images: int | None = None, threshold: float = 0.6,
                 boundary_as_foreground: bool = False, device="cpu", amp_dtype=None, batch_size: int = 32,
                 figure_dir: str | Path | None = None, num_figures: int = 0, mean=None, std=None):
        from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD

        self.dataset, self.image_size, self.threshold = dataset, image_size, threshold
        self.boundary_as_foreground = boundary_as_foreground
        self.n = len(dataset) if max_images is None else min(max_images, len(dataset))
        self.device, self.amp_dtype, self.batch_size = torch.device(device), amp_dtype, batch_size
        self.figure_dir, self.num_figures = figure_dir, num_figures
        self.mean, self.std = mean or IMAGENET_MEAN, std or IMAGENET_STD

    def _batch(self, indices):
        images, masks = [], []
        for i in indices:
            img, mask = self.dataset[i]
            images.append(resize_image(img, self.image_size))
            masks.append(resize_mask(mask, self.image_size))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return normalize(x, self.mean, self.std), torch.from_numpy(np.stack(masks).astype(np.int64))

    @torch.inference_mode()
    def __call__(self, backbone: torch.nn.Module, tag: str) -> dict[str, float]:
        ignore = self.dataset.ignore_index
        merged_sum = best_sum = 0.0
        figure = None
        for start in range(0, self.n, self.batch_size):
            x, masks = self._batch(range(start, min(start + self.batch_size, self.n)))
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                _, attention = backbone.forward_with_attention(x.to(self.device))
            merged, best, fg = attention_jaccards(attention.float().cpu(), masks, ignore, self.threshold,
                                                  self.boundary_as_foreground)
            merged_sum += float(merged.sum())
            best_sum += float(best.sum())
            if figure is None:
                figure = (masks, fg)
        if self.figure_dir is not None and self.num_figures > 0 and figure is not None:
            masks, fg = figure
            k = min(self.num_figures, len(masks))
            truth = (masks[:k] != 0).long()
            if ignore is not None:
                truth[masks[:k] == ignore] = ignore
            _segmentation_figure(self.dataset, k, self.image_size, truth, {"attention (merged)": fg[:k].long()},
                                 Path(self.figure_dir) / f"attn_monitor_{tag}.png", 2, ignore)
        return {"attn/jaccard_merged": 100.0 * merged_sum / self.n,
                "attn/jaccard_best_head": 100.0 * best_sum / self.n}


# ------------------------------------------------------------------------------------------------ building

def monitor_dataset(monitor_cfg, data_cfg, paths_cfg):
    """The split a monitor reads: generated synthetic scenes, or an evaluation dataset under ``paths``."""
    if monitor_cfg.dataset == "synthetic":
        from neco.data.synthetic import SyntheticScenes

        return SyntheticScenes(monitor_cfg.split, num_images=monitor_cfg.val_images, image_size=data_cfg.synthetic_size,
                               seed=data_cfg.synthetic_seed)
    from neco.data.eval_datasets import build_eval_dataset

    roots = OmegaConf.to_container(paths_cfg, resolve=True) if OmegaConf.is_config(paths_cfg) else dict(paths_cfg)
    return build_eval_dataset(monitor_cfg.dataset, monitor_cfg.split, roots)


def build_monitor(monitor_cfg, data_cfg, paths_cfg, *, device, amp_dtype, progress: bool, run_dir):
    """``KMeansMonitor`` or ``AttentionMonitor`` from the training config's ``monitor`` (``MonitorConfig``)."""
    dataset = monitor_dataset(monitor_cfg, data_cfg, paths_cfg)
    if monitor_cfg.name == "kmeans":
        try:
            resolve_ks(list(monitor_cfg.ks), dataset.num_classes)
        except ValueError as err:
            raise ConfigError(f"monitor.ks: {err}") from err
    common = dict(image_size=monitor_cfg.image_size, max_images=monitor_cfg.max_images, device=device,
                  amp_dtype=amp_dtype, batch_size=monitor_cfg.batch_size, figure_dir=Path(run_dir) / "figures",
                  num_figures=monitor_cfg.num_figures)
    if monitor_cfg.name == "kmeans":
        return KMeansMonitor(dataset, mask_size=monitor_cfg.mask_size, ks=list(monitor_cfg.ks),
                             pca_dim=monitor_cfg.pca_dim,
                             pca_max_points=monitor_cfg.pca_max_points, iters=monitor_cfg.kmeans_iters,
                             restarts=monitor_cfg.kmeans_restarts, seed=monitor_cfg.kmeans_seed,
                             per_class=monitor_cfg.per_class, threads=monitor_cfg.faiss_threads, progress=progress,
                             **common)
    if monitor_cfg.name == "attention":
        return AttentionMonitor(dataset, threshold=monitor_cfg.attn_threshold,
                                boundary_as_foreground=monitor_cfg.boundary_as_foreground, **common)
    raise ValueError(f"monitor.name={monitor_cfg.name!r} is not a monitor ({', '.join(MONITORS)})")
