"""Schema of `python -m neco.eval` (conf/evaluate.yaml).

It extends the training schema so that every `experiment` preset composes for evaluation too (a preset sets
training options as well; evaluation ignores them). `eval` is a mapping of selected protocols,
``{protocol name: its options}``, each protocol checking its own options (neco.eval.context.typed_options).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from neco.choices import EvalCheckpointModel
from neco.config import TrainConfig
from neco.overrides import field_type


@dataclass
class EvalAppConfig(TrainConfig):
    eval: Any = field(default_factory=dict)  # {protocol: options}, from eval=<protocol> or eval=[p1,p2]
    checkpoint: Optional[str] = None  # a checkpoint of this project or any backbone file; null: backbone.weights
    checkpoint_model: EvalCheckpointModel = EvalCheckpointModel.student  # student (METHOD.md §5) | teacher
    batch_size: int = 32  # feature extraction
    num_workers: int = 4  # loader processes (at most the number of CPU cores)
    cache_features: bool = True  # features of a split are extracted once per (weights, data, resolution)
    cache_dir: str = "${paths.output_dir}/cache/features"
    num_figures: int = 4
    synthetic_val_images: int = 128  # data=synthetic: size of the validation split (train: data.synthetic_images)
    append_table: bool = True  # add the results to the table in paths.results


# The options dataclass of each protocol (neco.eval.runner.PROTOCOLS runs them), imported only when needed.
PROTOCOL_OPTIONS = {
    "overcluster": ("neco.eval.overcluster.protocol", "OverclusterOptions"),
    "hummingbird": ("neco.eval.hummingbird.protocol", "HummingbirdOptions"),
    "linear": ("neco.eval.linear.protocol", "LinearOptions"),
    "unsup_seg": ("neco.eval.unsupervised.protocol", "UnsupSegOptions"),
    "quick": ("neco.eval.quick.protocol", "QuickOptions"),
}


def protocol_option_type(key: str) -> Any:
    """The declared type of a protocol option ``eval.<protocol>.<option>`` (None for other keys): lets the
    command line check a choice's value before anything runs, while the keys under ``eval`` stay open."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "eval" or parts[1] not in PROTOCOL_OPTIONS:
        return None
    module, name = PROTOCOL_OPTIONS[parts[1]]
    return field_type(getattr(importlib.import_module(module), name), parts[2])


def register_eval_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalAppConfig)


register_eval_configs()
