"""Dense nearest-neighbour retrieval, reduced to its exact core (METHOD.md §6.3 without augmentation or memory
sampling).

Every training patch carries the histogram of its pixels' labels; every validation patch takes the softmax-weighted
(temperature) histograms of its k most similar training patches, and the upsampled class scores give the prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neco.eval.primitives.metrics import confusion_matrix, iou_from_confusion

# Rough cap on the (queries x memory) similarity block: the search's peak memory stays bounded for any split.
_SIM_BLOCK_ELEMENTS = 1 << 24


def knn_search(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    query_chunk: int | None = None,
    memory_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner-product search; returns ``(similarities (Q, k), indices (Q, k))``, best first.

    Queries are processed in chunks and, for a large memory, the memory too, merging running top-k lists, so
    the largest temporary is ``query_chunk x (memory_chunk + k)`` whatever the sizes.
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

    Ignore pixels are left out of the histogram (a patch made only of them gets an all-zero row and so
    contributes nothing as a neighbour). Pixel ``(y, x)`` belongs to patch ``(y * h // H, x * w // W)``, which
    is the exact patch partition when the mask size is a multiple of the grid.
    """
    n, H, W = masks.shape
    h, w = grid
    py = (torch.arange(H) * h // H).view(1, H, 1)
    px = (torch.arange(W) * w // W).view(1, 1, W)
    img = torch.arange(n).view(n, 1, 1)
    cell = (img * h + py) * w + px
    labels = masks.long()
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        valid &= labels != ignore_index
    # Invalid pixels go to an extra class column that is dropped afterwards: cheaper than gathering the
    # valid pixels with a boolean index.
    flat = cell * (num_classes + 1) + torch.where(valid, labels, num_classes)
    counts = torch.bincount(flat.reshape(-1), minlength=n * h * w * (num_classes + 1))
    counts = counts.view(n, h, w, num_classes + 1)[..., :num_classes].float()
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

    Returns ``{"miou", "pixel_acc", "per_class_iou"}`` and, when ``num_predictions > 0``, ``"predictions"``:
    the predicted label maps ``(num_predictions, H, W)`` of the first val images.
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
