"""What every evaluation protocol receives: the frozen model, the dataset's splits, shared features, a run dir.

A protocol is a module ``neco.eval.<name>`` with a dataclass of its options and a function
``run(ctx: EvalContext, cfg) -> ProtocolResult``. ``cfg`` is that protocol's sub-config (``cfg.eval.<name>``);
:func:`typed_options` turns it into the protocol's dataclass so that a misspelt option fails naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neco.choices import plain
from neco.errors import ConfigError
from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor
from neco.eval.primitives.labels import CENTRE, LEGACY_NEAREST
from neco.overrides import field_type, invalid_choice_message, unknown_key_message


@dataclass
class ProtocolResult:
    """``metrics``: flat ``{name: float}`` (the numbers of the results table, mIoU in percent);
    ``options``: every setting the numbers depend on, defaults included; ``figures``: PNG paths written;
    ``extra``: anything else worth keeping in results.json (per-class IoU, per-seed values, subset files)."""

    metrics: dict[str, float]
    options: dict[str, Any]
    figures: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    model: torch.nn.Module  # normalised (B, 3, S, S) -> final-norm patch tokens (B, h, w, D); frozen
    patch_size: int
    embed_dim: int
    dataset_name: str  # voc | coco_stuff | coco_things | ade20k | cityscapes | synthetic
    get_dataset: Callable[[str], Any]  # split ("train", "val", ...) -> segmentation dataset
    extractor: FeatureExtractor
    device: torch.device
    amp_dtype: torch.dtype | None
    out_dir: Path  # this protocol's output folder (figures, saved heads, subset lists)
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    progress: bool = True
    num_figures: int = 4  # images shown in each image / truth / prediction figure
    _datasets: dict = field(default_factory=dict, repr=False)

    def dataset(self, split: str):
        """The configured dataset's ``split``, built once per context."""
        if split not in self._datasets:
            self._datasets[split] = self.get_dataset(split)
        return self._datasets[split]

    def features(
        self,
        split: str,
        image_size: int,
        mask_size: int | None = None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        label_resize: str = LEGACY_NEAREST,
        input_resize: str = CENTRE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(float16 (N, h, w, D), uint8 (N, m, m))`` features and masks of a whole split.

        Masks: ``input_resize`` to ``image_size``, then ``label_resize`` to ``mask_size``
        (neco.eval.primitives.labels.resize_mask)."""
        return self.extractor.extract(
            self.dataset(split), image_size, mask_size, mean=mean, std=std, desc=f"features {split} {image_size}px",
            label_resize=label_resize, input_resize=input_resize,
        )


# Reserved key of a protocol's options: names of options set explicitly (they override per_dataset blocks).
EXPLICIT_KEY = "__explicit__"


def typed_options(schema: type, cfg: Mapping | None, dataset_name: str | None = None, protocol: str = ""):
    """Merge ``cfg`` over the defaults of dataclass ``schema`` (unknown or mistyped keys fail clearly).

    A ``per_dataset: {<dataset>: {...}}`` entry in ``cfg`` (a mapping, not part of ``schema``) is applied on
    top for ``dataset_name``: that is how a protocol keeps published defaults for the real datasets while the
    small synthetic split gets sizes a CPU evaluates in seconds. Options the user set explicitly (listed by the
    caller under the reserved key ``EXPLICIT_KEY``, e.g. from the command line) win over ``per_dataset``.
    Returns an instance of ``schema``.
    """
    raw = OmegaConf.to_container(OmegaConf.create(dict(cfg or {})), resolve=True)
    per_dataset = raw.pop("per_dataset", None) or {}
    explicit = raw.pop(EXPLICIT_KEY, None) or []
    layers = [raw]
    if dataset_name and dataset_name in per_dataset:
        layers.append(per_dataset[dataset_name])
        layers.append({k: raw[k] for k in explicit if k in raw})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        where = f"eval.{protocol}.{key}" if protocol else key
        choices = field_type(schema, key) if key else None
        if isinstance(choices, type) and issubclass(choices, enum.Enum):
            value = next((layer[key] for layer in reversed(layers) if isinstance(layer, dict) and key in layer), "")
            raise ConfigError(invalid_choice_message(where, value, choices) or f"{where}: invalid value") from err
        reason = (key and unknown_key_message(schema, key)) or str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"invalid evaluation option {where}: {reason}") from err
    return OmegaConf.to_object(merged)


def options_dict(options) -> dict[str, Any]:
    """The dataclass as a plain dict (choices as plain strings), for results.json and saved heads."""
    return plain(dataclasses.asdict(options))
