"""A small Python API for downstream work: load a backbone, get dense patch features.

    import neco
    model = neco.load_backbone("dinov2_vits14_reg", weights="neco_on_dinov2r_vit14_model.ckpt")
    feats = neco.extract_features(model, images, image_size=448)   # (N, 384, 32, 32)

Both are re-exported lazily by ``neco`` itself, so ``import neco`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics, as every DINO/DINOv2/NeCo model is trained and evaluated with (spec §5).
from neco.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco.models.backbone import Backbone, build_backbone


def load_backbone(
    name: str,
    weights: str | Path = "default",
    *,
    checkpoint_model: str = "auto",
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    strict: bool = True,
    cache_dir: str | Path | None = None,
) -> Backbone:
    """A registry backbone with its weights, in eval mode, on ``device``.

    ``name``: a registry name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ``dino_vits16``, ``vit_tiny``, ...;
    ``neco.models.BACKBONES`` lists them). ``weights``: ``"default"`` (the official weights), ``"random"``, a
    local file (``.pth``/``.ckpt``/``.safetensors``), an ``https://`` URL or ``hf://<owner>/<repo>/<file>``;
    downloads happen once into ``cache_dir`` (torch.hub's folder by default). ``checkpoint_model``:
    ``"student"`` or ``"teacher"`` for files that hold both (``"auto"``: the student of NeCo and of this
    project's checkpoints, the teacher of DINO/DINOv2 training checkpoints). Loading is strict: weights that
    do not fit the architecture raise ``neco.models.WeightsError`` naming what differs.

    The model maps images ``(B, 3, H, W)``, ImageNet-normalised, to final-norm patch tokens
    ``(B, H // p, W // p, D)``; use ``extract_features`` for feature maps of raw images.

    >>> model = load_backbone("vit_tiny", weights="random")
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 8, 8, 128])
    """
    model = build_backbone(name, weights=str(weights), strict=strict, drop_path_rate=0.0, img_size=img_size,
                           cache_dir=cache_dir, checkpoint_model=checkpoint_model)
    return model.to(device).eval()


def _as_tensor(image) -> torch.Tensor:
    """One image (PIL image or ``(3, H, W)`` tensor) as a float ``(3, H, W)`` tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if hasattr(image, "convert"):  # PIL: grayscale, palette, RGBA, CMYK all become RGB
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    raise TypeError(f"images must be a (N, 3, H, W) tensor or a list of PIL images, not {type(image).__name__}")


def _resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _batches(images, batch_size: int, size: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    """Float batches in [0, 1]; lists are resized image by image (they may differ in size), tensors later."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            x = images[i: i + batch_size]
            yield x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return
    for i in range(0, len(images), batch_size):
        items = [_resize(_as_tensor(im)[None], size)[0] for im in images[i: i + batch_size]]
        sizes = {tuple(t.shape[-2:]) for t in items}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sorted(sizes)}: pass image_size=... to resize them")
        yield torch.stack(items)


def extract_features(
    model: torch.nn.Module,
    images: torch.Tensor | Sequence,
    *,
    image_size: int | tuple[int, int] | None = None,
    normalize: bool = True,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Patch-feature maps ``(N, D, h, w)`` (float32, on the CPU) of a batch of images.

    ``images``: a ``(N, 3, H, W)`` float tensor with values in [0, 1] (``uint8`` tensors are divided by 255),
    or a list of PIL images (or of ``(3, H, W)`` tensors). ``image_size``: resize every image to this square
    size (or ``(H, W)``) first, bilinearly with antialiasing; needed when the images differ in size.
    ``normalize``: apply the ImageNet mean and std (turn off for images normalised already). ``h, w`` are the
    image size divided by the patch size (pixels beyond the last full patch are dropped). Runs in
    ``torch.inference_mode``, in eval mode (the model's mode is restored after), with bf16 autocast on CUDA.
    ``device``: where to run, default the model's device; the model is moved there.

    >>> model = load_backbone("vit_tiny", weights="random")
    >>> extract_features(model, torch.rand(2, 3, 80, 64)).shape
    torch.Size([2, 128, 10, 8])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for x in _batches(images, batch_size, size):
                x = _resize(x.to(device, non_blocking=True), size)
                if normalize:
                    x = (x - mean) / std
                # (B, h, w, D) -> (B, D, h, w); the copy to the CPU waits for the GPU (one sync per batch).
                outputs.append(model(x).permute(0, 3, 1, 2).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("extract_features got no images")
    return torch.cat(outputs)
