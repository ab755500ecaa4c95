"""Every entry point's `--help`: what it does, three example commands, its own groups, and no torch import.

`--help`, `--cfg job` and config errors must answer before torch loads (torch alone takes seconds to import):
the check is on what was imported (`python -X importtime`), not on a wall time, which would be flaky.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "faiss", "matplotlib", "scipy")
ENTRY_POINTS = ["neco.train", "neco.eval", "neco.export", "neco.launch", "neco.data.prepare", "neco.data.check"]


def run_module(module, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level package names of every module `-X importtime` reported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_describes_the_command_with_three_examples_without_importing_torch(module):
    proc = run_module(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(f"python -m {module}:"), out[:200]  # first line: the command and what it does
    examples = out.split("Examples", 1)[1].split("\n\n", 1)[0]
    commands = [line for line in examples.splitlines() if line.strip().startswith(f"python -m {module} ")]
    assert len(commands) == 3, examples
    assert "${" not in out and "Powered by Hydra" not in out  # every interpolation resolved; no bare Hydra text
    heavy = imported_modules(proc.stderr) & set(HEAVY)
    assert not heavy, f"{module} --help imported {sorted(heavy)}"


def test_help_lists_the_options_of_each_group_from_conf():
    out = run_module("neco.train", "--help").stdout
    for option in ("quickstart", "small/neco_dinov2", "vit_tiny", "dinov2_vits14_reg", "wandb"):
        assert re.search(rf"\b{re.escape(option)}\b", out), option


def test_eval_help_lists_evaluation_groups_only():
    out = run_module("neco.eval", "--help").stdout
    groups = {line.split()[0] for line in out.split("Configuration groups", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
              if line.startswith("  ") and not line.startswith("   ")}
    assert groups == {"eval", "data", "backbone", "experiment", "paths"}
    for protocol in ("overcluster", "hummingbird", "linear", "unsup_seg"):
        assert protocol in out
    assert "monitor" not in groups and "debug" not in groups  # training-only groups


@pytest.mark.parametrize("args,needle", [
    (["--cfg", "job", "experiment=quickstart"], "global_size: 64"),
    (["loss.studnet_steepness=1"], "studnet_steepness"),
])
def test_cfg_job_and_config_errors_answer_before_torch_loads(tmp_path, args, needle):
    proc = run_module("neco.train", *args, cwd=tmp_path)
    assert needle in proc.stdout + proc.stderr
    assert "torch" not in imported_modules(proc.stderr)


def test_eval_cfg_job_does_not_import_torch(tmp_path):
    proc = run_module("neco.eval", "experiment=quickstart", "data=synthetic", "eval=quick", "--cfg", "job",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" not in imported_modules(proc.stderr)
