"""Schema of `python -m neco.eval` (conf/evaluate.yaml).

It extends the training schema so that every `experiment` preset composes for evaluation too (a preset sets
training options as well; evaluation ignores them). `eval` is a mapping of selected protocols,
``{protocol name: its options}``, each protocol checking its own options (neco.eval.context.typed_options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from neco.choices import EvalCheckpointModel
from neco.config import TrainConfig


@dataclass
class EvalAppConfig(TrainConfig):
    eval: Any = field(default_factory=dict)  # {protocol: options}, from eval=<protocol> or eval=[p1,p2]
    checkpoint: Optional[str] = None  # a checkpoint of this project or any backbone file; null: backbone.weights
    checkpoint_model: EvalCheckpointModel = EvalCheckpointModel.student  # student (spec §5) | teacher
    batch_size: int = 32  # feature extraction
    num_workers: int = 4  # loader processes (at most the number of CPU cores)
    cache_features: bool = True  # features of a split are extracted once per (weights, data, resolution)
    cache_dir: str = "${paths.output_dir}/cache/features"
    num_figures: int = 4
    synthetic_val_images: int = 128  # data=synthetic: size of the validation split (train: data.synthetic_images)
    append_table: bool = True  # add the results to the table in paths.results


def register_eval_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalAppConfig)


register_eval_configs()
