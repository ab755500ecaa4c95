"""Small, exact dense evaluations for quick checks: NN retrieval (METHOD.md §6.3) and k-means (METHOD.md §6.1/§6.2).

These are deliberately reduced versions of the full protocols (no augmented memory, no memory sampling, one
k-means restart by default) so that a few hundred small images evaluate in seconds on a CPU, e.g. in the
quickstart and in the trainer's before/after comparison.

Datasets yield ``(PIL RGB image, LongTensor mask (H, W))`` and expose ``num_classes`` and ``ignore_index``.
The model maps a normalised ``(B, 3, S, S)`` batch to final-norm patch tokens ``(B, h, w, D)`` (no CLS, no
registers), which is the backbone contract of this project.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from neco.eval.primitives.features import NORMALISE_UNIT, FeatureExtractor, resize_image
from neco.eval.primitives.kmeans import TooFewPoints, faiss_threads, kmeans_assign
from neco.eval.primitives.labels import CENTRE, resize_label_map
from neco.eval.primitives.metrics import (
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    many_to_one_match,
    remap_confusion,
)
from neco.eval.primitives.pca import standardise_and_project
from neco.eval.quick.retrieval import nn_retrieval_miou, patch_label_histograms

# (x - mean) / (std + 1e-5) in float64, PCA fitted on the rows faiss samples itself (neco.eval.primitives.pca).
QUICK_PCA = dict(constant_dims="eps", eps=1e-5, precision="float64")

__all__ = [
    "quick_features",
    "patch_label_histograms",
    "nn_retrieval_miou",
    "kmeans_miou",
    "quick_evaluate",
]


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return progress


def quick_features(
    model: torch.nn.Module,
    dataset,
    image_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU features ``float32 (N, h, w, D)`` and masks ``int64 (N, S, S)`` of the whole ``dataset``.

    The shared extractor (neco.eval.primitives.features) with the quick check's settings: images resized by PIL
    (antialiased bilinear), normalised in torchvision's order (``x / 255``, then mean and std), features kept
    in float32, masks resized once, with PIL's nearest (``centre``), to the input size. The model's mode is
    restored afterwards, so the trainer can call this in the middle of a run.
    """
    extractor = FeatureExtractor(model, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                 progress=_show_progress(progress))
    feats, masks = extractor.extract(dataset, image_size, input_resize=CENTRE, normalise=NORMALISE_UNIT,
                                     feature_dtype=torch.float32)
    return feats, masks.long()


def kmeans_miou(
    val_feats: torch.Tensor,
    val_masks: torch.Tensor,
    num_classes: int,
    k: int | None = None,
    seeds: Sequence[int] = (0,),
    niter: int = 50,
    pca_dim: int | None = 50,
    ignore_index: int | None = 255,
    nredo: int = 1,
    init: str = "k-means++",
    num_predictions: int = 0,
    threads: int | None = 1,
) -> dict:
    """Cluster the val patch features with k-means and score the clusters against the masks.

    ``k == num_classes`` (the default) uses Hungarian matching, any other ``k`` many-to-one precision
    matching. Metrics are averaged over ``seeds``; ``"predictions"`` (the class maps of the first
    ``num_predictions`` images, after matching) come from the first seed. Seeding is greedy k-means++;
    ``init="random"`` gives faiss's own uniform seeding, as the reference uses.

    ``threads`` caps faiss's threads for the call: these sets are small, and on a shared CPU multi-threaded
    faiss spins at its barriers, measured 10-60x slower than one thread here (``None``: faiss's default).
    """
    k = num_classes if k is None else k
    n, h, w, d = val_feats.shape
    rows = val_feats.reshape(-1, d).numpy()
    if rows.shape[0] < k:
        raise TooFewPoints(f"k-means with k={k} needs at least k patches, got {rows.shape[0]}")
    with faiss_threads(threads):
        x = standardise_and_project(lambda: [rows], rows.shape[0], d, pca_dim, **QUICK_PCA)
    size = tuple(val_masks.shape[-2:])
    mious, accs, per_class, preds = [], [], [], None
    for seed in seeds:
        with faiss_threads(threads):
            assign, _ = kmeans_assign(x, k, niter=niter, nredo=nredo, seed=int(seed), init=init, restarts="reseeded")
        # Centre sampling, as the PIL-resized masks it is compared with (quick_features).
        clusters = resize_label_map(torch.from_numpy(assign.reshape(n, h, w).astype(np.int64)), size, CENTRE)
        conf = confusion_matrix(clusters, val_masks, k, num_classes, ignore_index)
        mapping = hungarian_match(conf) if k == num_classes else many_to_one_match(conf, "precision")
        iou, miou, acc = iou_from_confusion(remap_confusion(conf, mapping, num_classes))
        mious.append(miou)
        accs.append(acc)
        per_class.append(iou)
        if preds is None and num_predictions > 0:
            preds = mapping[clusters[:num_predictions]]
    out = {
        "miou": float(np.mean(mious)),
        "pixel_acc": float(np.mean(accs)),
        "per_class_iou": torch.stack(per_class).mean(dim=0).tolist(),
        "miou_per_seed": mious,
    }
    if preds is not None:
        out["predictions"] = preds
    return out


def quick_evaluate(
    model: torch.nn.Module,
    train_set,
    val_set,
    image_size: int,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    nn_k: int = 30,
    temperature: float = 0.02,
    kmeans_k: int | None = None,
    kmeans_seeds: Sequence[int] = (0,),
    kmeans_niter: int = 50,
    pca_dim: int | None = 50,
    figure_path: str | None = None,
    figure_images: int = 4,
    figure_title: str | None = None,
    per_class: bool = False,
    progress: bool | None = None,
) -> dict:
    """NN-retrieval and k-means mIoU of ``model`` on ``val_set`` (memory from ``train_set``), as flat keys.

    The result holds only scalars (``nn/miou``, ``nn/pixel_acc``, ``kmeans/miou``, ``kmeans/pixel_acc``, all in
    percent, as every protocol reports them) so a metrics logger can take it as is; ``per_class=True`` adds the
    per-class IoU lists (``*/per_class_iou``, percent).

    With ``figure_path``, a PNG of the first ``figure_images`` val images (image / truth / NN / k-means) is
    written there.
    """
    num_classes, ignore_index = val_set.num_classes, val_set.ignore_index
    extract = dict(
        image_size=image_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype, progress=progress
    )
    train_feats, train_masks = quick_features(model, train_set, **extract)
    val_feats, val_masks = quick_features(model, val_set, **extract)
    n_fig = min(figure_images, len(val_set)) if figure_path else 0
    common = dict(ignore_index=ignore_index, num_predictions=n_fig)
    nn = nn_retrieval_miou(
        train_feats, train_masks, val_feats, val_masks, num_classes, k=nn_k, temperature=temperature, **common
    )
    km_args = dict(k=kmeans_k, seeds=kmeans_seeds, niter=kmeans_niter, pca_dim=pca_dim)
    km = kmeans_miou(val_feats, val_masks, num_classes, **km_args, **common)
    out = {}
    for prefix, res in (("nn", nn), ("kmeans", km)):  # the scorers' fractions, in % as every protocol's
        out[f"{prefix}/miou"] = 100.0 * res["miou"]
        out[f"{prefix}/pixel_acc"] = 100.0 * res["pixel_acc"]
        if per_class:
            out[f"{prefix}/per_class_iou"] = [100.0 * v for v in res["per_class_iou"]]
    if n_fig:
        # Imported here so that evaluation without figures never touches matplotlib.
        from neco.viz import save_segmentation_figure

        images = [resize_image(val_set[i][0], image_size) for i in range(n_fig)]
        save_segmentation_figure(
            images,
            val_masks[:n_fig],
            {f"NN retrieval (mIoU {out['nn/miou']:.1f}%)": nn["predictions"],
             f"k-means (mIoU {out['kmeans/miou']:.1f}%)": km["predictions"]},
            figure_path,
            num_classes=num_classes,
            ignore_index=ignore_index,
            class_names=getattr(val_set, "class_names", None),
            title=figure_title,
        )
    return out
