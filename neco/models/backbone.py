"""ViT backbones (DINO, DINOv2, DINOv2 with registers, a tiny test ViT) built through timm.

``Backbone`` owns timm's modules under timm's names, so ``Backbone.timm_state_dict()`` is a plain timm
``VisionTransformer`` state dict (``state_dict()`` too, except that register models keep DINOv2's CLS entry in
``pos_embed`` unless ``cls_position="folded"``: the parameters the reference trains). Its forward is our own,
on top of those modules, because the position embeddings must be interpolated exactly as the DINO/DINOv2 code
does (METHOD.md §2.3), which timm's ``dynamic_img_size`` path does not do (it resizes to a target size with
antialiasing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from neco.errors import ConfigError
from neco.models.formats import (
    architecture_hint,
    check_checkpoint_model,
    extract_backbone_state,
    to_timm_layout,
)
from neco.models.registry import BACKBONES, BackboneSpec, get_spec  # noqa: F401  (BACKBONES also read from here)
from neco.models.stochastic_depth import apply_drop_path_mode
from neco.models.weights import load_checked, read_checkpoint, resolve_weights

log = logging.getLogger(__name__)


def create_vit(spec: BackboneSpec, drop_path_rate: float = 0.0, img_size: int | None = None,
               drop_path_mode: str = "reference") -> nn.Module:
    """The randomly initialised timm ``VisionTransformer`` of a registry entry (no download, no head).

    ``drop_path_mode``: ``reference`` gives DINOv2-style blocks DINOv2's batch-subset stochastic depth where
    their rate exceeds 0.1; ``per_sample`` keeps timm's DropPath everywhere (see ``stochastic_depth``).
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    kwargs = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate,
                  img_size=img_size or spec.img_size)
    # timm spaces the per-block drop-path rates linearly from 0 to drop_path_rate in float32, as DINO/DINOv2 do.
    vit = timm.create_model(spec.timm_name, pretrained=False, **{**kwargs, **spec.timm_kwargs})
    apply_drop_path_mode(vit.blocks, spec.family, drop_path_mode)
    return vit


def interpolate_pos_embed(patch_pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a square grid of patch position embeddings ``(1, M*M, D)`` to ``(1, h*w, D)`` (METHOD.md §2.3).

    This is DINO's and DINOv2's formula: bicubic with a *scale factor* of ``(h + 0.1) / M`` (rows) and
    ``(w + 0.1) / M`` (columns), no antialiasing, in float32. The 0.1 makes the output size come out as
    exactly ``h x w``; the scale factor (rather than a target size) also sets the sampling positions,
    so the result differs from ``F.interpolate(size=(h, w))``.
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                         align_corners=False)
    if grid.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, not {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)


CLS_POSITIONS = ("separate", "folded")


def fold_cls_position(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's register layout: the CLS entry of ``pos_embed`` added into ``cls_token`` and removed."""
    pos = state["pos_embed"]
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


class Backbone(nn.Module):
    """A timm ViT returning final-norm patch tokens ``(B, h, w, D)`` for any input size.

    ``h = H // patch_size`` and ``w = W // patch_size``; pixels beyond the last full patch are dropped,
    as the patch convolution itself would. CLS and register tokens are computed but not returned.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec, name: str, cls_position: str = "separate"):
        super().__init__()
        if vit.num_reg_tokens and not vit.no_embed_class:
            raise ValueError("register tokens with position embeddings are not a DINOv2 layout")
        if cls_position not in CLS_POSITIONS:
            raise ConfigError(f"backbone.cls_position={cls_position!r}: choose one of {', '.join(CLS_POSITIONS)}")
        if vit.num_reg_tokens and cls_position == "separate":
            # DINOv2's own parameters: cls_token and a pos_embed with a CLS entry, two tensors that AdamW moves
            # separately (the CLS input moves twice as far per step as with timm's folded cls_token).
            # A zero CLS entry keeps the network unchanged.
            pos = vit.pos_embed
            vit.pos_embed = nn.Parameter(torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos.detach()], dim=1))
            vit.no_embed_class = False
        self.name, self.spec = name, spec
        self.patch_size = spec.patch_size
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[-1].attn.num_heads
        self.num_register_tokens = vit.num_reg_tokens
        self.num_prefix_tokens = vit.num_prefix_tokens  # CLS + registers
        # pos_embed holds a CLS entry unless timm folded it into cls_token (its layout for register models).
        self.no_embed_class = vit.no_embed_class
        self._pos_prefix = 0 if vit.no_embed_class else 1

        # Adopt timm's modules and parameters under timm's names (the other timm modules are identities).
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.register_parameter("reg_token", vit.reg_token)
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        if set(self.state_dict()) != set(vit.state_dict()):
            raise RuntimeError(f"timm model {spec.timm_name} has parameters the backbone does not use")

    @property
    def separate_cls_position(self) -> bool:
        """Register model holding DINOv2's CLS entry in ``pos_embed`` (``backbone.cls_position=separate``)."""
        return self.reg_token is not None and not self.no_embed_class

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the layout of the timm model ``spec.timm_name`` (what exports write)."""
        state = self.state_dict()
        return fold_cls_position(state) if self.separate_cls_position else state

    def _match_cls_position(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Give a timm-layout register state this model's CLS parametrisation (the network stays the same)."""
        pos = state.get("pos_embed")
        if self.reg_token is None or pos is None or pos.ndim != 3 or "reg_token" not in state:
            return state
        has_cls_entry = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2 == 1
        if self.separate_cls_position and not has_cls_entry:
            return {**state, "pos_embed": torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)}
        if not self.separate_cls_position and has_cls_entry:
            return fold_cls_position(state)
        return state

    @property
    def grid_size(self) -> int:
        """Side of the stored (square) position-embedding grid."""
        return math.isqrt(self.pos_embed.shape[1] - self._pos_prefix)

    # ------------------------------------------------------------------------------------------ forward

    def _pos_embed_for(self, h: int, w: int, square_input: bool) -> torch.Tensor:
        """Position embeddings ``(1, 1 + h*w, D)`` for CLS and an ``h x w`` grid of patches."""
        patch = self.pos_embed[:, self._pos_prefix:]
        # DINO/DINOv2 use the stored grid unchanged only when the patch count matches and the input
        # (in pixels) is square; any other size, even with the same count, is interpolated.
        if not (h * w == patch.shape[1] and square_input):
            patch = interpolate_pos_embed(patch, h, w)
        # With timm's register layout the CLS position embedding lives in cls_token: add zero to CLS.
        cls = self.pos_embed[:, :1] if self._pos_prefix else patch.new_zeros(1, 1, patch.shape[-1])
        return torch.cat([cls.to(patch.dtype), patch], dim=1)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Input images ``(B, 3, H, W)`` -> tokens ``[CLS, registers, patches]`` before the blocks."""
        B, _, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        if h < 1 or w < 1:
            raise ValueError(f"input of {H}x{W} px is smaller than one {p}x{p} patch")
        x = self.patch_embed(x[:, :, : h * p, : w * p]).reshape(B, h * w, -1)
        # Same order of operations as DINOv2: concatenate CLS, add position embeddings in the tokens'
        # dtype, then insert the registers (which get no position embedding) right after CLS.
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self._pos_embed_for(h, w, H == W).to(x.dtype)
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x, h, w

    def _patch_grid(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.norm(tokens)[:, self.num_prefix_tokens:].reshape(tokens.shape[0], h, w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, h, w = self._tokens(x)
        return self._patch_grid(self.blocks(tokens), h, w)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens as ``forward`` plus the last block's CLS->patch attention ``(B, heads, h, w)``.

        The softmax runs over all keys (CLS, registers, patches) and only the patch entries are returned,
        so a map sums to at most 1. It is recomputed from the last block's q and k because the fused
        attention kernel never materialises it; the block output is the normal one.
        """
        tokens, h, w = self._tokens(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        attn = self._cls_attention(self.blocks[-1], tokens)
        tokens = self.blocks[-1](tokens)
        return self._patch_grid(tokens, h, w), attn.reshape(attn.shape[0], attn.shape[1], h, w)

    def _cls_attention(self, blk: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        a = blk.attn
        B, N, _ = tokens.shape
        qkv = a.qkv(blk.norm1(tokens)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(qkv[0][:, :, :1]), a.k_norm(qkv[1])
        # float32 softmax: under autocast the logits arrive in bf16/fp16.
        logits = (q.float() * a.scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
        return logits.softmax(dim=-1)[:, :, 0, self.num_prefix_tokens:]

    # ------------------------------------------------------------------------------------------ weights

    def load_weights(self, source: str | Path | Mapping, strict: bool = True,
                     checkpoint_model: str | None = "auto", key: str = "backbone.weights",
                     label: str | None = None) -> None:
        """Load pretrained weights from a checkpoint file or an already-read checkpoint object.

        ``checkpoint_model`` picks the student or the teacher of files that hold both (``auto``: the
        teacher of DINO/DINOv2 training checkpoints, the student of NeCo and of this project's checkpoints).
        ``key`` is the setting named in errors; ``label`` names an already-read object (its file) in them.
        """
        label = label or ("checkpoint" if isinstance(source, Mapping) else str(source))
        obj = source if isinstance(source, Mapping) else read_checkpoint(source, key=key)
        found = extract_backbone_state(obj, label, checkpoint_model)
        state = self._fit_pos_grid(found.state, label)
        if self.separate_cls_position and "register_tokens" in state:
            # DINOv2 files: keep their cls_token / CLS position split (timm's conversion would fold it).
            state = {("reg_token" if k == "register_tokens" else k): v for k, v in state.items()}
        state = to_timm_layout(state, self, drop_registers=self.spec.drop_registers, source=label)
        state = self._match_cls_position(state)
        hint = architecture_hint(state, self, self.name, found.trained_as)
        report = load_checked(self, state, strict=strict, source=label, backbone=self.name, hint=hint, key=key)
        where = f" ('{found.prefix}', {found.role})" if found.prefix else ""
        log.info("backbone %s: loaded %d tensors from %s%s", self.name, report.loaded, label, where)

    def _fit_pos_grid(self, state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
        """Resample a stored position-embedding grid that differs from this model's (``img_size``).

        Done with the same formula as at run time, so the model at ``img_size`` computes what the
        checkpoint's own grid would give at that size.
        """
        pos = state.get("pos_embed")
        if pos is None or pos.ndim != 3:
            return state
        n = pos.shape[1]
        prefix = n - math.isqrt(n) ** 2  # 1 with a CLS entry, 0 without
        side = math.isqrt(n - prefix)
        kernel = state.get("patch_embed.proj.weight")
        if prefix > 1 or side == self.grid_size or (kernel is not None and kernel.shape[-1] != self.patch_size):
            return state  # same grid, or another architecture: reported by the loader, not adapted
        g = self.grid_size
        log.warning("%s: position-embedding grid %dx%d resampled to %dx%d (img_size=%d)",
                    label, side, side, g, g, g * self.patch_size)
        patch = interpolate_pos_embed(pos[:, prefix:], g, g).to(pos.dtype)
        return {**state, "pos_embed": torch.cat([pos[:, :prefix], patch], dim=1)}


def build_backbone(
    name: str,
    weights: str = "default",
    strict: bool = True,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_model: str | None = "auto",
    key: str = "backbone.weights",
    drop_path_mode: str = "reference",
    cls_position: str = "separate",
) -> Backbone:
    """Build a registry backbone and load its weights.

    ``weights``: ``"default"`` (official weights of that backbone, downloaded once), ``"random"``,
    a local checkpoint path (``.safetensors`` too), an ``https://`` URL or ``hf://<owner>/<repo>/<file>``.
    ``strict``: any missing, unexpected or mis-shaped tensor is an error (``backbone.strict=false`` only
    warns). ``img_size``: the image size the stored position-embedding grid is built for (default: the
    official one); other sizes are interpolated. ``checkpoint_model``: ``student``, ``teacher`` or ``auto``
    for files holding both networks (see ``Backbone.load_weights``). ``key``: the setting errors name.
    ``drop_path_mode`` and ``cls_position``: the reference's stochastic depth and register-model parameters, or
    timm's (see ``create_vit``, ``Backbone``).
    """
    spec = get_spec(name)
    check_checkpoint_model(checkpoint_model)
    # Resolve (and download) first: a missing file fails before a large model is built.
    path = resolve_weights(weights, spec.weights_url, name, cache_dir, key=key)
    backbone = Backbone(create_vit(spec, drop_path_rate, img_size, drop_path_mode), spec, name, cls_position)
    if path is None:
        level = logging.WARNING if spec.weights_url else logging.INFO
        log.log(level, "backbone %s: random initialisation (backbone.weights=random)", name)
    else:
        backbone.load_weights(path, strict=strict, checkpoint_model=checkpoint_model, key=key)
    g = backbone.grid_size
    log.info("backbone %s: timm %s, patch %d, dim %d, %d registers, stored grid %dx%d, drop_path %.3g",
             name, spec.timm_name, spec.patch_size, backbone.embed_dim, backbone.num_register_tokens, g, g,
             drop_path_rate)
    return backbone
