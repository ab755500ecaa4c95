"""Attention for the noisy foreground masks of unsupervised segmentation (METHOD.md §6.5.2): what only the
evaluation needs.

``attention_maps`` runs a model over a dataset for the head-averaged last-block CLS attention; the masks
themselves come from ``neco.loss.masks.attention_foreground`` (blur, 65 % of the mass, components of at most 2
cells dropped), the one implementation the training masks (§3.8) and the attention monitor (§6.6) use too. It
lives there because the training objective must not import the evaluation package. The masks stay at token
resolution; CBFE upsamples them.

The reference ships such masks precomputed for its models (its xFormers attention cannot return the
attention matrix), so masks can also be read from a file: either a ``.pt`` / ``.npz`` holding one array per
split, or a folder with the reference's ``attn_train.pt`` and ``attn_val.pt``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from neco.errors import ConfigError
from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image

__all__ = ["attention_maps", "load_attention_masks"]


class _Images(Dataset):
    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(resize_image(self.dataset[i][0], self.size).copy()).permute(2, 0, 1)


def attention_maps(
    model: torch.nn.Module,
    dataset,
    image_size: int,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    progress: bool = False,
) -> torch.Tensor:
    """Head-averaged last-block CLS attention ``float32 (N, h, w)`` of every image (same inputs as features)."""
    forward = getattr(model, "forward_with_attention", None)
    if forward is None:
        raise ConfigError(
            f"eval.unsup_seg: the model ({type(model).__name__}) has no forward_with_attention, so the noisy "
            "foreground masks cannot be computed; pass precomputed ones with eval.unsup_seg.attention_masks=PATH"
        )
    device = torch.device(device)
    loader = DataLoader(_Images(dataset, image_size), batch_size=batch_size, num_workers=num_workers)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            for x in tqdm(loader, desc="CLS attention", unit="batch", disable=not progress, leave=False):
                _, attn = forward(normalize(x.to(device), mean, std))
                out.append(attn.float().mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _as_masks(value, where: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value))
    if t.ndim == 4 and t.shape[1] == 1:  # the reference stores (N, 1, h, w)
        t = t[:, 0]
    if t.ndim != 3:
        raise ConfigError(f"eval.unsup_seg.attention_masks: {where} must be (N, h, w) or (N, 1, h, w), "
                          f"got shape {tuple(t.shape)}")
    return t > 0.5 if t.is_floating_point() else t != 0


def load_attention_masks(path: str | Path, split: str, role: str, num_images: int) -> torch.Tensor:
    """Boolean ``(N, h, w)`` masks of ``split`` (``role``: "train" or "val") from ``path``.

    ``path`` is a ``.pt``/``.npz`` mapping (key: the split name or the role) or a folder with the reference's
    ``attn_<role>.pt`` files.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        f = p / f"attn_{role}.pt"
        if not f.is_file():
            raise ConfigError(f"eval.unsup_seg.attention_masks={p}: no {f.name} in that folder")
        masks = _as_masks(torch.load(f, map_location="cpu", weights_only=True), str(f))
    elif p.is_file():
        if p.suffix == ".npz":
            with np.load(p) as data:
                table = {k: data[k] for k in data.files}
        else:
            table = torch.load(p, map_location="cpu", weights_only=True)
        key = split if split in table else role
        if key not in table:
            raise ConfigError(f"eval.unsup_seg.attention_masks={p}: no entry {split!r} or {role!r} "
                              f"(found {sorted(table)})")
        masks = _as_masks(table[key], f"{p}[{key}]")
    else:
        raise ConfigError(f"eval.unsup_seg.attention_masks={p}: no such file or folder")
    if masks.shape[0] != num_images:
        raise ConfigError(f"eval.unsup_seg.attention_masks={p}: {masks.shape[0]} {role} masks for "
                          f"{num_images} images of split {split!r}")
    return masks
