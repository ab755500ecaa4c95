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

# ImageNet statistics, as every DINO/DINOv2/NeCo model is trained and evaluated with (METHOD.md §5).
from neco.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco.models.backbone import Backbone, build_backbone
from neco.models.registry import BACKBONES
from neco.models.weights import WeightsError

# The settings that errors of the shared loading code name, as the arguments of ``load_backbone`` they are here.
_PYTHON_WORDING = (
    ("backbone.strict=false", "strict=False"),
    ("backbone.checkpoint_model", "checkpoint_model"),
    ("backbone.weights", "weights"),
    ("backbone.name", "name"),
)


def _in_python_terms(err: Exception) -> str:
    text = str(err)
    for cli, python in _PYTHON_WORDING:
        text = text.replace(cli, python)
    return text


def _architecture(name: str, weights: str | Path) -> tuple[str, str | Path]:
    """A registry name, a preset of ``conf/backbone/`` or a checkpoint -> (registry name, weights source)."""
    from neco.models.presets import presets

    if name in BACKBONES:
        return name, weights
    preset = presets().get(name)
    if preset is not None:
        if str(weights) == "default" and preset.weights is None:
            raise WeightsError(
                f"load_backbone({name!r}) needs the weights you give: load_backbone({name!r}, "
                f"weights='/path/to/checkpoint') (a file, https:// URL or hf:// address; "
                f"conf/backbone/{name}.yaml lists the files it accepts).")
        return preset.architecture, weights
    if Path(name).expanduser().is_file() or "://" in name:  # a checkpoint given as the name
        if str(weights) != "default":
            raise ValueError(f"load_backbone({name!r}, weights={str(weights)!r}): give the checkpoint either as "
                             "the name or as weights=, not both.")
        return "", name
    known = sorted(set(BACKBONES) | set(presets()))
    raise ValueError(f"Unknown backbone {name!r} (and no such checkpoint file). Valid names: {', '.join(known)}.")


def _from_recorded_checkpoint(source: str, cache_dir, checkpoint_model: str, strict: bool,
                              img_size: int | None) -> Backbone:
    """This project's checkpoints record their backbone: build that architecture and load the file."""
    from neco.models.backbone import create_vit
    from neco.models.formats import check_checkpoint_model, recorded_backbone
    from neco.models.registry import get_spec
    from neco.models.weights import read_checkpoint, resolve_weights

    check_checkpoint_model(checkpoint_model)
    path = resolve_weights(source, None, "checkpoint", cache_dir, key="name")
    obj = read_checkpoint(path, key="name")
    arch = recorded_backbone(obj)
    if arch not in BACKBONES:
        raise WeightsError(f"name={source}: the checkpoint does not record its backbone: call "
                           f"load_backbone('<backbone name>', weights={source!r}) (e.g. 'dinov2_vits14_reg').")
    spec = get_spec(arch)
    model = Backbone(create_vit(spec, 0.0, img_size), spec, arch)
    model.load_weights(obj, strict=strict, checkpoint_model=checkpoint_model, key="name", label=str(path))
    return model


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
    """A backbone with its weights, in eval mode, on ``device``.

    ``name``: a registry name (``dinov2_vits14``, ``dinov2_vitb14_reg``, ``dino_vits16``, ``vit_tiny``, ...;
    ``neco.models.BACKBONES`` lists them), a preset of the command line's ``conf/backbone/`` (``neco_vits14``,
    ``leopart_vits16``, ``timetuning_vits16``: an architecture whose weights you give), or a checkpoint of this
    project (it records its backbone). ``weights``: ``"default"`` (the official weights), ``"random"``, a
    local file (``.pth``/``.ckpt``/``.safetensors``), an ``https://`` URL (optionally ending in
    ``#sha256=<hex>``) or ``hf://<owner>/<repo>/<file>``; downloads happen once into ``cache_dir``, by default
    the command line's ``paths.weights`` (``$NECO_WEIGHTS``, else ``$NECO_ROOT/weights``, else ``./weights``).
    ``checkpoint_model``: ``"student"`` or ``"teacher"`` for files that hold both (``"auto"``: the student of
    NeCo and of this project's checkpoints, the teacher of DINO/DINOv2 training checkpoints). Loading is
    strict: weights that do not fit the architecture, or hold NaN or inf, raise ``neco.models.WeightsError``
    naming what differs and the argument to change.

    The model maps images ``(B, 3, H, W)``, ImageNet-normalised, to final-norm patch tokens
    ``(B, H // p, W // p, D)``; use ``extract_features`` for feature maps of raw images.

    >>> model = load_backbone("vit_tiny", weights="random")
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 8, 8, 128])
    """
    try:  # cache_dir=None: the command line's default paths.weights (neco.models.weights.default_cache_dir)
        arch, weights = _architecture(name, weights)
        if not arch:
            model = _from_recorded_checkpoint(str(weights), cache_dir, checkpoint_model, strict, img_size)
        else:
            model = build_backbone(arch, weights=str(weights), strict=strict, drop_path_rate=0.0,
                                   img_size=img_size, cache_dir=cache_dir, checkpoint_model=checkpoint_model,
                                   key="weights")
    except WeightsError as err:
        raise WeightsError(_in_python_terms(err)) from None
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
