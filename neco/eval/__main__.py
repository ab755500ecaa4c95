"""`python -m neco.eval`: evaluate a backbone's frozen dense features. Hydra composes conf/evaluate.yaml.

    python -m neco.eval backbone=dinov2_vits14 data=voc eval=hummingbird
    python -m neco.eval experiment=quickstart checkpoint=outputs/runs/quickstart/checkpoints/last.pt \\
        data=synthetic 'eval=[overcluster,hummingbird,linear]'
    python -m neco.eval -m backbone=dinov2_vits14,dinov2_vits14_reg eval=overcluster   # a sweep
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import neco.config  # noqa: F401  (registers the training schema and resolvers the presets use)
import neco.eval.config  # noqa: F401  (registers the evaluation schema)
import neco.help_texts  # noqa: F401  (the resolvers of `--help`)
from neco.cli import checked_command_line, exit_on_user_error
from neco.project import conf_dir


@checked_command_line(neco.eval.config.EvalAppConfig, open_type=neco.eval.config.protocol_option_type)
@hydra.main(config_path=str(conf_dir()), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    # Imported here, not at the top: `--help`, `--cfg job` and config errors answer before torch loads.
    import torch

    from neco.eval.runner import evaluate

    torch.set_float32_matmul_precision("high")
    with exit_on_user_error(" for this evaluation"):
        hydra_cfg = HydraConfig.get()
        records = evaluate(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    first = next(iter(records[0]["metrics"].values()), float("nan")) if records else float("nan")
    return float(first)  # the sweeper's objective: the first metric of the first protocol


if __name__ == "__main__":
    main()
