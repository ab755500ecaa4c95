"""The linear segmentation head and its scoring (METHOD.md §6.4): 1x1 convolution, upsampled logits, mIoU.

The reference upsamples the ``(B, D, h, w)`` patch features bilinearly to the mask size and applies the 1x1
convolution there. Both operations are linear and bilinear weights sum to one (the bias passes through), so
convolving at token resolution and upsampling the ``C`` logit maps is the same function with the same
gradients, at ``C/D`` of the memory: a batch of 128 ViT-S features at 448x448 would otherwise take 39 GB.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from neco.eval.primitives.metrics import confusion_matrix, iou_from_confusion

__all__ = [
    "make_head",
    "head_logits",
    "confusion_on_features",
    "linear_miou",
    "TopK",
    "save_head",
    "load_head",
    "eval_mode",
    "masked_cross_entropy",
]


def make_head(embed_dim: int, num_classes: int, seed: int) -> nn.Conv2d:
    """``Conv2d(D, C, 1)`` with bias, default PyTorch init drawn from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=True)


def head_logits(head: nn.Module, tokens: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, h, w, D)`` tokens -> ``(B, C, size, size)`` logits (bilinear, ``align_corners=False`` as the
    reference's ``interpolate``); the 1x1 convolution is applied before the upsampling (module docstring)."""
    logits = head(tokens.permute(0, 3, 1, 2).float())
    if logits.shape[-2:] == (size, size):
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def confusion_on_features(
    head: nn.Module,
    feats: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device,
    chunk: int | None = None,
    keep_predictions: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Confusion matrix ``conf[gt, pred]`` of the argmax at the masks' resolution over all given images.

    ``feats`` ``(N, h, w, D)`` (any dtype, any device; moved in chunks as float32) and ``masks``
    ``(N, m, m)``. Returns the matrix and, with ``keep_predictions``, the first predictions ``(k, m, m)``.
    """
    size = masks.shape[-1]
    if chunk is None:
        # About 2**27 floats (512 MB) of features plus logits per chunk: full-resolution masks of a
        # 151-class dataset need small chunks, 100x100 masks of 21 classes large ones.
        per_image = num_classes * size * size + feats[0].numel()
        chunk = max(1, min(256, 2**27 // per_image))
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    preds = []
    for start in range(0, len(feats), chunk):
        x = feats[start : start + chunk].to(device, non_blocking=True).float()
        y = masks[start : start + chunk].to(device, non_blocking=True).long()
        pred = head_logits(head, x, size).argmax(dim=1)
        conf += confusion_matrix(pred, y, num_classes, num_classes, ignore_index)
        if start < keep_predictions:
            preds.append(pred[: keep_predictions - start].cpu())
    return conf.cpu(), (torch.cat(preds) if preds else None)


def linear_miou(
    conf: torch.Tensor, ignore_index: int | None, count_ignore_class: bool = True
) -> tuple[torch.Tensor, float, float]:
    """Per-class IoU, mIoU and pixel accuracy (both in percent) of an identity-matched confusion matrix.

    When the ignore index is itself a class id (ADE20K: 151 labels, 0 ignored), no pixel of that class is
    ever scored, so its IoU is 0. ``count_ignore_class`` (the reference) still averages it in: mIoU over 151
    classes, i.e. 150/151 of the mean over the other 150 (METHOD.md §10.14). Otherwise it is left out.
    """
    iou, miou, acc = iou_from_confusion(conf)
    num_classes = conf.shape[0]
    if not count_ignore_class and ignore_index is not None and 0 <= ignore_index < num_classes:
        keep = torch.ones(num_classes, dtype=torch.bool)
        keep[ignore_index] = False
        miou = float(iou[keep].mean())
    return iou, 100.0 * miou, 100.0 * acc


class TopK:
    """The ``k`` best heads by val mIoU on disk, as Lightning's ``ModelCheckpoint(save_top_k=k, mode="max")``.

    A new head enters when fewer than ``k`` are kept or when its mIoU is strictly above the worst kept one
    (which is then deleted); on ties the earlier head stays.
    """

    def __init__(self, k: int, directory: Path | None):
        if k < 1:
            raise ValueError(f"keep_top must be >= 1, got {k}")
        self.k, self.directory = k, Path(directory) if directory is not None else None
        self.kept: list[dict] = []  # {"epoch", "miou", "path"}, best first

    def offer(self, epoch: int, miou: float, payload: dict | None = None) -> bool:
        """Record epoch ``epoch``'s head; writes ``payload`` when it is kept. Returns whether it was kept."""
        if len(self.kept) >= self.k and not miou > self.kept[-1]["miou"]:
            return False
        path = None
        if self.directory is not None and payload is not None:
            path = self.directory / f"epoch={epoch:03d}-miou={miou:.4f}.pt"
            save_head(path, payload)
        self.kept.append({"epoch": epoch, "miou": miou, "path": str(path) if path else None})
        # Stable sort: among equal mIoUs the earlier epoch stays ahead, and the newest is evicted first.
        self.kept.sort(key=lambda e: -e["miou"])
        if len(self.kept) > self.k:
            evicted = self.kept.pop()
            if evicted["path"]:
                Path(evicted["path"]).unlink(missing_ok=True)
        return True

    @property
    def best(self) -> dict | None:
        return self.kept[0] if self.kept else None


def save_head(path: Path, payload: dict) -> None:
    """Atomic write of a head: ``state_dict`` plus plain metadata (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_head(path: str | Path) -> tuple[nn.Conv2d, dict]:
    """A saved head and its metadata (epoch, mIoU, image and mask size, options)."""
    path = Path(path)
    if not path.is_file():
        from neco.errors import ConfigError

        raise ConfigError(f"eval.linear.head: no saved head at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    weight = payload["state_dict"]["weight"]
    head = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1, bias=True)
    head.load_state_dict(payload["state_dict"])
    return head.eval(), payload


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Put ``module`` in eval mode for the block and restore its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Mean pixel cross-entropy over non-ignored pixels; 0 (not NaN) for a batch without any valid pixel.

    Dividing the summed loss by ``max(count, 1)`` on the device avoids a host sync to test for empty batches.
    """
    ignore = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(logits, target, ignore_index=ignore, reduction="sum")
    count = (target != ignore).sum().clamp_min(1)
    return loss / count
