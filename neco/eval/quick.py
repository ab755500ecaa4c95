"""Small, exact dense evaluations for quick checks: NN retrieval (§6.3) and k-means (§6.1/§6.2).

These are deliberately reduced versions of the full protocols (no augmented memory, no memory sampling, one
k-means restart by default) so that a few hundred small images evaluate in seconds on a CPU, e.g. in the quickstart
and in the trainer's before/after comparison. Datasets yield ``(PIL RGB image, LongTensor mask (H, W))`` and expose
``num_classes`` and ``ignore_index``; the model maps a normalised ``(B, 3, S, S)`` batch to final-norm patch tokens
``(B, h, w, D)`` (no CLS / registers), which is the backbone contract of this project.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from neco.eval.metrics import (
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    many_to_one_match,
    remap_confusion,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_eval_batch",
    "extract_dense_features",
    "knn_search",
    "patch_label_histograms",
    "nn_retrieval_miou",
    "kmeans_miou",
    "quick_evaluate",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Rough cap on the (queries x memory) similarity block; keeps the search's peak memory bounded whatever the split.
_SIM_BLOCK_ELEMENTS = 1 << 24


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of integer label maps ``(..., H, W)``.

    ``nearest-exact`` samples at pixel centres, which is what PIL's NEAREST (used by the reference loaders) does;
    plain ``nearest`` would shift every label by half a source pixel when downsampling.
    """
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()  # labels < 2**24 are exact in float32
    out = F.interpolate(flat, size=size, mode="nearest-exact")
    return out.round().long().reshape(*lead, *size)


def load_eval_batch(dataset, indices: Sequence[int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, S, S)`` (antialiased bilinear, ImageNet-normalised) and masks ``(B, S, S)`` (nearest)."""
    images, masks = [], []
    for i in indices:
        img, mask = dataset[i]
        x = TF.pil_to_tensor(img.convert("RGB")).float().div_(255.0)
        x = TF.resize(x, [image_size, image_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        images.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        masks.append(_resize_mask(torch.as_tensor(mask), (image_size, image_size)))
    return torch.stack(images), torch.stack(masks)


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return progress


def extract_dense_features(
    model: torch.nn.Module,
    dataset,
    image_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``dataset``; returns features ``(N, h, w, D)`` float32 and masks ``(N, S, S)`` on CPU.

    The model is put in eval mode for the pass and restored to its previous mode afterwards, so the trainer can call
    this in the middle of a run.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, masks = [], []
    n = len(dataset)
    bar = tqdm(total=n, desc="features", unit="img", disable=not _show_progress(progress), leave=False)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.inference_mode(), autocast:
            for start in range(0, n, batch_size):
                idx = range(start, min(start + batch_size, n))
                x, m = load_eval_batch(dataset, idx, image_size)
                out = model(x.to(device, non_blocking=True))
                if out.ndim != 4 or out.shape[0] != len(idx):
                    raise ValueError(f"model must return (B, h, w, D) patch features, got {tuple(out.shape)}")
                feats.append(out.float().cpu())
                masks.append(m)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if not feats:
        raise ValueError("empty dataset")
    return torch.cat(feats), torch.cat(masks)


def knn_search(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    query_chunk: int | None = None,
    memory_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner-product search; returns ``(similarities (Q, k), indices (Q, k))``, best first.

    Queries are processed in chunks and, for a large memory, the memory too, merging running top-k lists, so the
    largest temporary is ``query_chunk x (memory_chunk + k)`` whatever the sizes.
    """
    q_total, m_total = queries.shape[0], memory.shape[0]
    k = min(k, m_total)
    if memory_chunk is None:
        memory_chunk = max(min(m_total, _SIM_BLOCK_ELEMENTS // 1024), 1)
    if query_chunk is None:
        query_chunk = max(_SIM_BLOCK_ELEMENTS // max(min(memory_chunk, m_total), 1), 1)
    sims_out, idx_out = [], []
    for qs in range(0, q_total, query_chunk):
        q = queries[qs : qs + query_chunk]
        best_s = best_i = None
        for ms in range(0, m_total, memory_chunk):
            s = q @ memory[ms : ms + memory_chunk].T
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            i = i + ms
            if best_s is not None:
                s, pos = torch.cat([best_s, s], dim=1).topk(k, dim=1)
                i = torch.cat([best_i, i], dim=1).gather(1, pos)
            best_s, best_i = s, i
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def patch_label_histograms(
    masks: torch.Tensor, grid: tuple[int, int], num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Class-frequency histogram of the pixels under every patch: ``(N, h, w, C)``, rows summing to 1.

    Ignore pixels are left out of the histogram (a patch made only of them gets an all-zero row and so contributes
    nothing as a neighbour). Pixel ``(y, x)`` belongs to patch ``(y * h // H, x * w // W)``, which is the exact
    patch partition when the mask size is a multiple of the grid.
    """
    n, H, W = masks.shape
    h, w = grid
    py = (torch.arange(H) * h // H).view(1, H, 1)
    px = (torch.arange(W) * w // W).view(1, 1, W)
    img = torch.arange(n).view(n, 1, 1)
    cell = ((img * h + py) * w + px).expand(n, H, W)
    labels = masks.long()
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid &= labels != ignore_index
    flat = cell[valid] * num_classes + labels[valid]
    counts = torch.bincount(flat, minlength=n * h * w * num_classes).float().view(n, h, w, num_classes)
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)


def nn_retrieval_miou(
    train_feats: torch.Tensor,
    train_masks: torch.Tensor,
    val_feats: torch.Tensor,
    val_masks: torch.Tensor,
    num_classes: int,
    k: int = 30,
    temperature: float = 0.02,
    ignore_index: int | None = 255,
    num_predictions: int = 0,
    image_chunk: int = 16,
) -> dict:
    """Hummingbird-style dense NN label transfer from the train patches to every val patch, scored by mIoU.

    Returns ``{"miou", "pixel_acc", "per_class_iou"}`` and, when ``num_predictions > 0``, ``"predictions"``: the
    predicted label maps ``(num_predictions, H, W)`` of the first val images.
    """
    n_val, h, w, d = val_feats.shape
    hist = patch_label_histograms(train_masks, train_feats.shape[1:3], num_classes, ignore_index)
    hist = hist.reshape(-1, num_classes)
    memory = F.normalize(train_feats.reshape(-1, d).float(), dim=-1)
    queries = F.normalize(val_feats.reshape(-1, d).float(), dim=-1)
    sims, idx = knn_search(queries, memory, k)
    weights = torch.softmax(sims / temperature, dim=1)
    scores = torch.einsum("qk,qkc->qc", weights, hist[idx]).view(n_val, h, w, num_classes)

    size = tuple(val_masks.shape[-2:])
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    preds = []
    # Upsampled score maps are (C, H, W) per image; chunking over images keeps that bounded for large C.
    for s in range(0, n_val, image_chunk):
        maps = scores[s : s + image_chunk].permute(0, 3, 1, 2)
        pred = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).argmax(dim=1)
        conf += confusion_matrix(pred, val_masks[s : s + image_chunk], num_classes, num_classes, ignore_index)
        if s < num_predictions:
            preds.append(pred[: num_predictions - s])
    per_class, miou, acc = iou_from_confusion(conf)
    out = {"miou": miou, "pixel_acc": acc, "per_class_iou": per_class.tolist()}
    if num_predictions > 0:
        out["predictions"] = torch.cat(preds)
    return out


def _standardise_and_project(x: np.ndarray, pca_dim: int | None) -> np.ndarray:
    """Per-dimension standardisation (population std + 1e-5), then centred PCA without whitening (spec §6.1)."""
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-5)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if pca_dim is not None and pca_dim < x.shape[1]:
        pca = faiss.PCAMatrix(x.shape[1], pca_dim)  # eigen_power 0: projection only
        pca.train(x)
        x = pca.apply(x)
    return x


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
    num_predictions: int = 0,
) -> dict:
    """Cluster the val patch features with k-means and score the clusters against the masks.

    ``k == num_classes`` (the default) uses Hungarian matching, any other ``k`` many-to-one precision matching.
    Metrics are averaged over ``seeds``; ``"predictions"`` (the class maps of the first ``num_predictions``
    images, after matching) come from the first seed.
    """
    k = num_classes if k is None else k
    n, h, w, d = val_feats.shape
    x = _standardise_and_project(val_feats.reshape(-1, d).double().numpy(), pca_dim)
    if x.shape[0] < k:
        raise ValueError(f"k-means with k={k} needs at least k patches, got {x.shape[0]}")
    size = tuple(val_masks.shape[-2:])
    mious, accs, per_class, preds = [], [], [], None
    for seed in seeds:
        km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=int(seed), verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        clusters = _resize_mask(torch.from_numpy(assign.reshape(n, h, w).astype(np.int64)), size)
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
    progress: bool | None = None,
) -> dict:
    """NN-retrieval and k-means mIoU of ``model`` on ``val_set`` (memory from ``train_set``), as flat keys.

    With ``figure_path`` a PNG of the first ``figure_images`` val images (image / truth / NN / k-means) is written.
    """
    num_classes, ignore_index = val_set.num_classes, val_set.ignore_index
    extract = dict(image_size=image_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                   progress=progress)
    train_feats, train_masks = extract_dense_features(model, train_set, **extract)
    val_feats, val_masks = extract_dense_features(model, val_set, **extract)
    n_fig = min(figure_images, len(val_set)) if figure_path else 0
    nn = nn_retrieval_miou(train_feats, train_masks, val_feats, val_masks, num_classes, k=nn_k,
                           temperature=temperature, ignore_index=ignore_index, num_predictions=n_fig)
    km = kmeans_miou(val_feats, val_masks, num_classes, k=kmeans_k, seeds=kmeans_seeds, niter=kmeans_niter,
                     pca_dim=pca_dim, ignore_index=ignore_index, num_predictions=n_fig)
    out = {}
    for prefix, res in (("nn", nn), ("kmeans", km)):
        out[f"{prefix}/miou"] = res["miou"]
        out[f"{prefix}/pixel_acc"] = res["pixel_acc"]
        out[f"{prefix}/per_class_iou"] = res["per_class_iou"]
    if n_fig:
        # Imported here so that evaluation without figures never touches matplotlib.
        from neco.viz import save_segmentation_figure

        images, masks = load_eval_batch(val_set, range(n_fig), image_size)
        save_segmentation_figure(
            images, masks, {"NN retrieval": nn["predictions"], "k-means": km["predictions"]},
            figure_path, num_classes=num_classes, ignore_index=ignore_index,
        )
    return out
