"""Clustering and overclustering of frozen patch features (METHOD.md §6.2, the reference's ``eval_overcluster.py``).

Validation split only. Tokens of the whole split are standardised per dimension, projected on 50 principal
components and clustered with faiss k-means (Euclidean, 100 iterations, 5 restarts) for each seed; clusters
are computed at token resolution, nearest-upsampled to the 100x100 evaluation masks and scored on the
non-ignored pixels: Hungarian matching when K is the number of classes, many-to-one matching otherwise
(precision-based, the published overclustering number, and IoU-based alongside).

Metric keys: ``k<K>/miou`` (mean over seeds, percent), ``k<K>/miou_std``, ``k<K>/pixel_acc``; for K other
than the number of classes also ``k<K>/bg_fraction`` (clusters mapped to class 0) and the IoU-based matching
under ``k<K>_iou/...``. Per-seed, per-class IoU, precision and recall go to ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from neco.choices import LabelResize, MiouClasses
from neco.errors import ConfigError
from neco.eval.context import EvalContext, ProtocolResult, options_dict, typed_options
from neco.eval.primitives.batches import evaluated_count
from neco.eval.primitives.cluster_scoring import cluster_confusion, resolve_ks, score_clusters
from neco.eval.primitives.kmeans import faiss_threads, kmeans_assign
from neco.eval.primitives.labels import tokens_to_mask
from neco.eval.primitives.pca import standardise_and_project

# Datasets whose reference loader drops the last incomplete batch (METHOD.md §10.13): the VOC data module is built
# with drop_last=True in eval_overcluster.py; the COCO and ADE20K validation loaders keep every image.
_DROPS_LAST_BATCH = {"voc"}


@dataclass
class OverclusterOptions:
    split: str = "val"  # validation split only (METHOD.md §6.2)
    image_size: int = 448
    mask_size: int = 100  # clusters and ground truth are compared at mask_size x mask_size
    batch_size: int = 32  # the reference loader's batch size; it only matters through drop_last_batch
    ks: list[Any] = field(default_factory=lambda: ["classes", 500, 300])  # ints or "classes" (num_classes)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pca_dim: Optional[int] = 50  # null: no PCA
    # The reference fits faiss's PCA on every token (faiss then trains on 1000*D of them drawn at random);
    # the in-training monitor caps the slice at 4M. null: every token.
    pca_max_points: Optional[int] = None
    # 0: sklearn's StandardScaler, (x - mean) / std with constant dimensions left unscaled, as the reference
    # script (METHOD.md §6.2). 1e-5: the in-training monitor's (x - mean) / (std + 1e-5) (METHOD.md §6.1).
    std_eps: float = 0.0
    kmeans_iters: int = 100
    kmeans_restarts: int = 5  # faiss nredo: the best objective of this many runs
    spherical: bool = False
    # faiss trains k-means on at most this many sampled points per centroid (its default, which the
    # reference ran with); every token is then assigned.
    max_points_per_centroid: int = 256
    # METHOD.md §10.13: the reference evaluates 1,440 of VOC's 1,449 val images (last partial batch of 32
    # dropped). null: as the reference for the dataset (VOC: true, others: false).
    drop_last_batch: Optional[bool] = None
    # METHOD.md §10.14: "all" averages IoU over every class id, so ADE20K's ignored label 0 counts as a class with
    # IoU 0 (151 classes, the reference); "exclude_ignore" leaves out the class whose id is the ignore index.
    miou_classes: MiouClasses = MiouClasses.all
    faiss_threads: Optional[int] = None  # null: faiss's default (all cores)
    # How the 448 px ground truth is shrunk to mask_size and the token cluster maps are enlarged to it:
    # legacy_nearest (torch's nearest, top-left source pixel of each cell: the reference) | centre (PIL's
    # nearest at cell centres). See neco/eval/primitives/labels.py.
    label_resize: LabelResize = LabelResize.legacy_nearest


def _check(opts: OverclusterOptions) -> None:
    if not opts.seeds:
        raise ConfigError("eval.overcluster.seeds: give at least one seed")
    if opts.batch_size < 1 or opts.mask_size < 1 or opts.kmeans_iters < 1 or opts.kmeans_restarts < 1:
        raise ConfigError("eval.overcluster: batch_size, mask_size, kmeans_iters and kmeans_restarts must be >= 1")


def pca_parameters(std_eps: float) -> dict:
    """Standardisation of the tokens (neco.eval.primitives.pca): std_eps 0 is sklearn's StandardScaler, as the
    reference script (METHOD.md §6.2); the PCA is fitted on the rows faiss draws itself, as the reference's."""
    rule = dict(constant_dims="rounding") if std_eps == 0 else dict(constant_dims="eps", eps=std_eps)
    return rule | dict(precision="float32")


def _token_chunks(feats: torch.Tensor, rows: int = 100_000):
    """Chunk source over the ``(N*h*w, D)`` token rows of cached float16 features, as float32 arrays."""
    flat = feats.reshape(-1, feats.shape[-1])

    def chunks():
        for start in range(0, flat.shape[0], rows):
            yield flat[start : start + rows].float().numpy()

    return chunks


def cluster_split(
    feats: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    opts: OverclusterOptions,
    progress: bool = False,
) -> dict:
    """Cluster ``(N, h, w, D)`` tokens for every K and seed and score them against ``(N, m, m)`` masks.

    Returns ``{k: {"criteria": {name: [per-seed score dicts]}, "clusters": first seed's (N, h, w) ids}}``
    where ``name`` is ``hungarian`` for K == num_classes, else ``precision`` and ``iou``.
    """
    n, h, w, d = feats.shape
    exclude = ignore_index if opts.miou_classes == "exclude_ignore" else None
    with faiss_threads(opts.faiss_threads):
        x = standardise_and_project(_token_chunks(feats), n * h * w, d, opts.pca_dim,
                                    pca_max_points=opts.pca_max_points, **pca_parameters(opts.std_eps))
        out = {}
        ks = list(dict.fromkeys(resolve_ks(opts.ks, num_classes)))  # "classes" may repeat an int
        runs = [(k, s) for k in ks for s in opts.seeds]
        for k, seed in tqdm(runs, desc="k-means", disable=not progress, leave=False):
            assign, _ = kmeans_assign(x, k, niter=opts.kmeans_iters, nredo=opts.kmeans_restarts, seed=int(seed),
                                      spherical=opts.spherical, max_points_per_centroid=opts.max_points_per_centroid)
            assign = torch.from_numpy(assign).view(n, h, w)
            conf = cluster_confusion(assign, masks, k, num_classes, ignore_index, image_size=opts.image_size,
                                     label_resize=opts.label_resize)
            criteria = ["hungarian"] if k == num_classes else ["precision", "iou"]
            entry = out.setdefault(k, {"criteria": {c: [] for c in criteria}, "clusters": assign})
            for c in criteria:
                entry["criteria"][c].append(score_clusters(conf, c, exclude_class=exclude))
    return out


def _summaries(results: dict, num_classes: int, class_names) -> tuple[dict, dict]:
    metrics, extra = {}, {}
    for k, entry in results.items():
        for criterion, scores in entry["criteria"].items():
            prefix = f"k{k}_iou" if criterion == "iou" else f"k{k}"
            mious = [s["miou"] for s in scores]
            metrics[f"{prefix}/miou"] = float(np.mean(mious))
            metrics[f"{prefix}/miou_std"] = float(np.std(mious))
            metrics[f"{prefix}/pixel_acc"] = float(np.mean([s["pixel_acc"] for s in scores]))
            if k != num_classes:
                metrics[f"{prefix}/bg_fraction"] = float(np.mean([s["bg_fraction"] for s in scores]))
            per_class = {
                stat: dict(zip(class_names, np.mean([s[stat] for s in scores], axis=0).tolist(), strict=True))
                for stat in ("iou", "precision", "recall")
            }
            extra[prefix] = {
                "matching": criterion,
                "miou_per_seed": mious,
                "bg_fraction_per_seed": [s["bg_fraction"] for s in scores],
                "per_class": per_class,  # means over seeds; fractions
            }
    return metrics, extra


def _figures(ctx: EvalContext, dataset, results: dict, feats, masks, opts, num_classes, ignore_index) -> list[str]:
    from neco.eval.primitives.features import resize_image
    from neco.viz import save_feature_pca_figure, save_segmentation_figure

    n = min(ctx.num_figures, feats.shape[0])
    if n <= 0:
        return []
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    images = [resize_image(dataset[i][0], opts.image_size) for i in range(n)]
    preds = {}
    for k, entry in results.items():
        criterion = next(iter(entry["criteria"]))  # hungarian, or the precision-based many-to-one
        mapping = entry["criteria"][criterion][0]["mapping"]
        clusters = tokens_to_mask(entry["clusters"][:n], opts.image_size, opts.mask_size, opts.label_resize)
        preds[f"K={k} ({criterion})"] = mapping[clusters]
    seg = save_segmentation_figure(images, masks[:n].long(), preds, ctx.out_dir / "overcluster_segmentation.png",
                                   num_classes=num_classes, ignore_index=ignore_index)
    pca = save_feature_pca_figure(images, feats[:n].float(), ctx.out_dir / "overcluster_feature_pca.png")
    return [str(seg), str(pca)]


def run(ctx: EvalContext, cfg) -> ProtocolResult:
    opts = typed_options(OverclusterOptions, cfg, ctx.dataset_name, "overcluster")
    _check(opts)
    dataset = ctx.dataset(opts.split)
    num_classes, ignore_index = dataset.num_classes, dataset.ignore_index
    try:
        resolve_ks(opts.ks, num_classes)
    except ValueError as err:
        raise ConfigError(f"eval.overcluster.ks: {err}") from err
    drop_last = opts.drop_last_batch if opts.drop_last_batch is not None else ctx.dataset_name in _DROPS_LAST_BATCH
    feats, masks = ctx.features(opts.split, opts.image_size, opts.mask_size, label_resize=opts.label_resize)
    n = evaluated_count(feats.shape[0], opts.batch_size, drop_last)
    if n == 0:
        raise ConfigError(f"eval.overcluster: {feats.shape[0]} images and drop_last_batch with batch_size "
                          f"{opts.batch_size} leave none to evaluate")
    feats, masks = feats[:n], masks[:n]
    results = cluster_split(feats, masks, num_classes, ignore_index, opts, progress=ctx.progress)
    class_names = list(getattr(dataset, "class_names", None) or [str(c) for c in range(num_classes)])
    metrics, extra = _summaries(results, num_classes, class_names)
    extra.update(num_images=n, num_images_in_split=int(len(dataset)), drop_last_batch=drop_last,
                 ks=list(results), token_grid=list(feats.shape[1:3]))
    figures = _figures(ctx, dataset, results, feats, masks, opts, num_classes, ignore_index)
    options = options_dict(opts) | {"drop_last_batch_resolved": drop_last}
    return ProtocolResult(metrics=metrics, options=options, figures=figures, extra=extra)
