"""`python -m neco.export`: write a checkpoint's backbone as a file that plain timm or torch.hub DINOv2 loads.

    python -m neco.export checkpoint=outputs/runs/dinov2_vits14_coco/checkpoints/last.pt format=timm
    python -m neco.export checkpoint=neco_on_dinov2r_vit14_model.ckpt backbone=dinov2_vits14_reg format=dinov2_hub
    python -m neco.export checkpoint=last.pt format=safetensors checkpoint_model=teacher

``format``: ``timm`` (a timm ``VisionTransformer`` state dict, ``.pth``), ``dinov2_hub`` (the key layout of the
torch.hub DINOv2 models, ``.pth``) or ``safetensors`` (timm's layout, no pickle at all). The checkpoint can be any
file ``backbone.weights`` accepts (this project's checkpoints, NeCo, DINO, DINOv2, Leopart, TimeT, timm; a path,
an https:// URL or hf://). This project's checkpoints record their backbone; other files need ``backbone=<name>``.

The file, ``export.json`` (source, network, recipe) and Hydra's record of the config are written to the run
directory ``${paths.output_dir}/exports/<name>``; the path and a one-line recipe to load it are printed.
Loading the result needs only torch and timm (or torch.hub), no code from this project.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import neco.help_texts  # noqa: F401  (the resolvers of `--help`)
from neco.cli import checked_command_line, exit_on_user_error
from neco.config import ExportConfig
from neco.errors import ConfigError
from neco.project import conf_dir

log = logging.getLogger("neco.export")

FORMATS = {"timm": ".pth", "dinov2_hub": ".pth", "safetensors": ".safetensors"}


@dataclass
class Exported:
    path: Path
    recipe: str  # one line of Python that loads the file
    info: dict  # what export.json holds


def _stem(source: str) -> str:
    """A short name for a checkpoint: its file name without extension (URLs and hf:// too)."""
    source = str(source)
    path = urlparse(source).path if "://" in source else source
    return Path(path).stem or "checkpoint"


if not OmegaConf.has_resolver("neco_stem"):
    OmegaConf.register_new_resolver("neco_stem", _stem)


def timm_recipe(backbone, path: Path, safetensors: bool = False) -> tuple[str, dict]:
    """The ``timm.create_model`` call that builds the same network, and the line that loads ``path`` into it."""
    spec = backbone.spec
    kwargs = {"pretrained": False, "num_classes": 0, "img_size": backbone.grid_size * backbone.patch_size,
              **spec.timm_kwargs}
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    load = f"load_file({str(path)!r})" if safetensors else f"torch.load({str(path)!r})"
    head = "import timm; from safetensors.torch import load_file" if safetensors else "import timm, torch"
    recipe = f"{head}; m = timm.create_model({spec.timm_name!r}, {args}); m.load_state_dict({load})"
    return recipe, {"timm_model": spec.timm_name, "timm_kwargs": kwargs}


def hub_recipe(backbone, path: Path, swiglu: bool) -> tuple[str, dict]:
    """torch.hub's DINOv2 entry point for official sizes, else the DINOv2 code's constructor arguments."""
    layer_scale = any(k.endswith("ls1.gamma") for k in backbone.state_dict())
    kwargs = {"img_size": backbone.grid_size * backbone.patch_size, "patch_size": backbone.patch_size,
              "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "num_heads": backbone.num_heads,
              "init_values": 1.0 if layer_scale else None, "ffn_layer": "swiglufused" if swiglu else "mlp",
              "block_chunks": 0}
    if backbone.num_register_tokens:
        kwargs["num_register_tokens"] = backbone.num_register_tokens
    load = f"m.load_state_dict(torch.load({str(path)!r}))"
    info = {"dinov2_kwargs": kwargs}
    official = {384: "s", 768: "b", 1024: "l", 1536: "g"}.get(backbone.embed_dim)
    if backbone.spec.family == "dinov2" and official and backbone.patch_size == 14:
        entry = f"dinov2_vit{official}14" + ("_reg" if backbone.num_register_tokens else "")
        info["torch_hub"] = ["facebookresearch/dinov2", entry]
        return f"import torch; m = torch.hub.load('facebookresearch/dinov2', {entry!r}, pretrained=False); {load}", info
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return ("import torch; from dinov2.models.vision_transformer import DinoVisionTransformer; "
            f"m = DinoVisionTransformer({args}); {load}"), info


def export_backbone(checkpoint: str, fmt: str, out_dir: str | Path, backbone: str | None = None,
                    checkpoint_model: str = "auto", strict: bool = True, cache_dir: str | None = None) -> Exported:
    """Load ``checkpoint``'s backbone (strictly, by default) and write it in ``fmt`` into ``out_dir``."""
    import timm.layers
    import torch
    from safetensors.torch import save_file

    from neco.models.backbone import Backbone, create_vit
    from neco.models.formats import check_checkpoint_model, recorded_backbone, to_hub_layout
    from neco.models.registry import get_spec
    from neco.models.weights import read_checkpoint, resolve_weights

    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}.")
    check_checkpoint_model(checkpoint_model)
    path = resolve_weights(str(checkpoint), None, backbone or "export", cache_dir, key="checkpoint")
    if path is None:
        raise ConfigError("checkpoint=random has no weights to export: give a checkpoint file.")
    obj = read_checkpoint(path, key="checkpoint")
    recorded = recorded_backbone(obj)
    if backbone and recorded and backbone != recorded:
        log.warning("backbone=%s, but the checkpoint was trained with backbone %s", backbone, recorded)
    name = backbone or recorded
    if name is None:
        raise ConfigError(f"checkpoint={checkpoint} does not record its backbone: set backbone=<name> "
                          "(e.g. backbone=dinov2_vits14_reg).")
    try:
        spec = get_spec(name)
    except ValueError as e:
        raise ConfigError(f"backbone={name}: {e}") from None
    model = Backbone(create_vit(spec), spec, name)
    model.load_weights(obj, strict=strict, checkpoint_model=checkpoint_model, key="checkpoint", label=str(path))

    state = {k: v.detach().clone().contiguous() for k, v in model.timm_state_dict().items()}
    swiglu = isinstance(model.blocks[0].mlp, timm.layers.GluMlp)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}_{fmt}{FORMATS[fmt]}"
    if fmt == "dinov2_hub":
        state = to_hub_layout(state, swiglu)
        recipe, info = hub_recipe(model, dst, swiglu)
    else:
        recipe, info = timm_recipe(model, dst, safetensors=fmt == "safetensors")
    tmp = dst.with_name(f".{dst.name}.tmp")  # written then renamed: never a half-written file under the name
    if fmt == "safetensors":
        save_file(state, str(tmp), metadata={"format": "timm", "timm_model": info["timm_model"],
                                              "source": str(checkpoint)})
    else:
        torch.save(state, tmp)
    tmp.replace(dst)
    info = {"source": str(checkpoint), "backbone": name, "checkpoint_model": checkpoint_model, "format": fmt,
            "file": dst.name, "tensors": len(state), "recipe": recipe, **info}
    (out_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return Exported(dst, recipe, info)


@checked_command_line(ExportConfig)
@hydra.main(config_path=str(conf_dir()), config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("", "/path/to/checkpoint"):
        backbone = cfg.backbone.name if cfg.get("backbone") else None
        out = export_backbone(cfg.checkpoint, cfg.format, HydraConfig.get().runtime.output_dir, backbone=backbone,
                              checkpoint_model=cfg.checkpoint_model, strict=cfg.strict, cache_dir=cfg.paths.weights)
    print(f"wrote {out.path}")
    print(f"load it with: {out.recipe}")


if __name__ == "__main__":
    main()
