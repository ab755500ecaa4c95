"""The quick check's dense NN retrieval (METHOD.md §6.1): Hummingbird-style label transfer from every train patch
to every val patch, without augmentation or memory sampling, scored by mIoU (as a fraction; callers report %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neco.eval.primitives.knn import knn_search
from neco.eval.primitives.metrics import confusion_matrix, iou_from_confusion


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
    sims, idx = knn_search(val_feats.reshape(-1, d), train_feats.reshape(-1, d), k, similarity="cosine")
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
