"""The backbone registry: each `backbone.name`'s timm model, patch size, width, registers and official weights.

Plain data, apart from the model code, so that the weight-format helpers (`neco.models.formats`) can name the
architecture a checkpoint fits without importing the models that load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackboneSpec:
    """One entry of the backbone registry."""

    timm_name: str
    patch_size: int
    embed_dim: int
    family: str  # "dinov2" | "dino" | "tiny"
    num_register_tokens: int = 0
    img_size: int = 224  # the image size the stored position-embedding grid is built for
    weights_url: str | None = None  # official weights used by backbone.weights=default
    weights_format: str | None = None  # "dinov2_hub" | "dino_full": layout of the official file
    drop_registers: bool = False  # XR: the official weights have registers, the model has none
    timm_kwargs: dict = field(default_factory=dict)  # overrides of the timm model's constructor arguments


def _dinov2_url(size: str, reg: bool) -> str:
    name = f"dinov2_vit{size}14"
    return f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}{'_reg4' if reg else ''}_pretrain.pth"


def _dino_url(name: str) -> str:
    return f"https://dl.fbaipublicfiles.com/dino/{name}/{name}_full_checkpoint.pth"


def _registry() -> dict[str, BackboneSpec]:
    specs: dict[str, BackboneSpec] = {}
    # LayerScale starts at 1.0 as in NeCo's constructor (METHOD.md §2.2); pretrained weights overwrite it.
    # timm's ViT-g/14 uses SwiGLU like the official model (the reference's plain MLP is METHOD.md §10.20).
    sizes = (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536))
    for size, word, dim in sizes:
        common = dict(patch_size=14, embed_dim=dim, family="dinov2", img_size=518,
                      weights_format="dinov2_hub", timm_kwargs={"init_values": 1.0})
        plain, reg = f"vit_{word}_patch14_dinov2", f"vit_{word}_patch14_reg4_dinov2"
        specs[f"dinov2_vit{size}14"] = BackboneSpec(plain, weights_url=_dinov2_url(size, False), **common)
        specs[f"dinov2_vit{size}14_reg"] = BackboneSpec(
            reg, num_register_tokens=4, weights_url=_dinov2_url(size, True), **common)
        specs[f"dinov2_vit{size}14_xr"] = BackboneSpec(
            plain, weights_url=_dinov2_url(size, True), drop_registers=True, **common)
    for name, timm_name, patch, dim, file in (
        ("dino_vits16", "vit_small_patch16_224", 16, 384, "dino_deitsmall16_pretrain"),
        ("dino_vits8", "vit_small_patch8_224", 8, 384, "dino_deitsmall8_pretrain"),
        ("dino_vitb16", "vit_base_patch16_224", 16, 768, "dino_vitbase16_pretrain"),
        ("dino_vitb8", "vit_base_patch8_224", 8, 768, "dino_vitbase8_pretrain"),
    ):
        specs[name] = BackboneSpec(timm_name, patch, dim, "dino", weights_url=_dino_url(file),
                                   weights_format="dino_full")
    # Random-init ViT for tests and the CPU quickstart: DINOv2-like blocks (LayerScale), sized for 32-112 px.
    # Depth 4 keeps a forward+backward of 64 crops of 64 px plus 256 of 32 px near one second on 2 cores.
    specs["vit_tiny"] = BackboneSpec(
        "vit_tiny_patch16_224", 8, 128, "tiny", img_size=112,
        timm_kwargs={"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "init_values": 1.0},
    )
    return specs


BACKBONES: dict[str, BackboneSpec] = _registry()


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'. Valid names: {', '.join(BACKBONES)}.")
    return BACKBONES[name]
