"""A small evaluation context for protocol tests: a tiny random ViT (or any model) on synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import torch

from neco.data.synthetic import SyntheticScenes
from neco.eval.context import EvalContext
from neco.eval.primitives.features import FeatureExtractor
from neco.models.backbone import build_backbone


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """vit_tiny (patch 8, dim 128, depth 12 in timm's tiny config) with random weights, in eval mode."""
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", weights="random").eval()


def synthetic_splits(train_images: int = 24, val_images: int = 12, image_size: int = 48, seed: int = 0):
    """``get_dataset`` for :class:`EvalContext`: split name -> SyntheticScenes of the given sizes."""

    def get(split: str):
        n = train_images if split.startswith("train") else val_images
        return SyntheticScenes("train" if split.startswith("train") else "val", num_images=n,
                               image_size=image_size, seed=seed)

    return get


def make_context(
    tmp_path: Path,
    model: torch.nn.Module | None = None,
    get_dataset=None,
    dataset_name: str = "synthetic",
    patch_size: int = 8,
    cache: bool = True,
    **kwargs,
) -> EvalContext:
    tmp_path = Path(tmp_path)
    model = tiny_vit() if model is None else model
    embed_dim = getattr(model, "embed_dim", 0)
    extractor = FeatureExtractor(model, batch_size=8, cache_dir=tmp_path / "cache" if cache else None,
                                 model_key="test", progress=False)
    return EvalContext(
        model=model,
        patch_size=patch_size,
        embed_dim=embed_dim,
        dataset_name=dataset_name,
        get_dataset=get_dataset or synthetic_splits(),
        extractor=extractor,
        device=torch.device("cpu"),
        amp_dtype=None,
        out_dir=Path(tmp_path) / "out",
        progress=False,
        **kwargs,
    )
