"""What `--help` prints: the option lists of the config groups, and the help of `python -m neco.launch`.

The Hydra entry points take their help text from `conf/hydra/help/<app>.yaml` (Hydra's `hydra.help.template`);
those templates list each group's options with the `${neco_choices:<group>}` resolver registered here, so the
lists follow the files in `conf/` instead of going stale. This module imports nothing heavy: `--help` must
answer before torch loads.
"""

from __future__ import annotations

import textwrap

from omegaconf import OmegaConf

from neco.project import conf_dir

CONF = conf_dir()


def group_choices(group: str, width: int = 100, indent: int = 14) -> str:
    """The options of config group ``group`` (``conf/<group>/**/*.yaml``), comma-separated, sorted, wrapped at
    ``width`` with continuation lines indented by ``indent`` spaces (the column the help templates use)."""
    folder = CONF / group
    names = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    return textwrap.fill(", ".join(names), width=width, subsequent_indent=" " * indent, break_on_hyphens=False)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("neco_choices"):
        OmegaConf.register_new_resolver("neco_choices", group_choices)


register_resolvers()

LAUNCH_HELP = """\
python -m neco.launch: submit one long training run to SLURM; it checkpoints and requeues itself at its time limit.

Every argument is an override of `python -m neco.train` (see `python -m neco.train --help`); the resources come
from a `hydra/launcher` preset (default slurm_1gpu; one task per GPU, DDP across them). It prints the job id, the
run directory and the log file; `--wait` waits for the end of the run. The run writes the same run directory as
`python -m neco.train` (outputs/runs/<run_name>/, with summary.md at the end).

Examples
  python -m neco.launch hydra/launcher=slurm_8gpu experiment=small/neco_dinov2 paths.coco=/data/coco/images
  python -m neco.launch hydra/launcher=slurm_1gpu hydra.launcher.partition=gpu hydra.launcher.timeout_min=240 \\
      experiment=small/neco_dino paths.coco=/data/coco/images
  python -m neco.launch hydra/launcher=slurm_8gpu hydra.launcher.nodes=2 hydra.launcher.timeout_min=10 \\
      debug=fast data=synthetic backbone=vit_tiny run_name=slurm-check --wait      # check the cluster first

Launcher presets (hydra/launcher=...): {launchers}
Partition and account: NECO_SLURM_PARTITION, NECO_SLURM_ACCOUNT or hydra.launcher.partition / .account.
More: README.md, section "Run on a cluster".
"""


def launch_help() -> str:
    return LAUNCH_HELP.format(launchers=group_choices("hydra/launcher"))
