"""Backbones, their weights, and the projection head."""

from neco.models.backbone import Backbone, build_backbone, interpolate_pos_embed
from neco.models.formats import CHECKPOINT_MODELS
from neco.models.head import ProjectionHead
from neco.models.registry import BACKBONES, BackboneSpec
from neco.models.weights import WeightsError

__all__ = [
    "BACKBONES",
    "CHECKPOINT_MODELS",
    "Backbone",
    "BackboneSpec",
    "ProjectionHead",
    "WeightsError",
    "build_backbone",
    "interpolate_pos_embed",
]
