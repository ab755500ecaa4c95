"""A non-editable install works: the wheel holds the configs, and the commands run from any folder.

The wheel is built from a copy of the checkout's packaged files and installed into a fresh virtual environment
that reaches the dependencies of the running one through a plain path in a .pth file (so the running
environment's editable install of the checkout, itself a .pth hook, is not loaded). The commands run from an
empty folder with PYTHONPATH unset: only the installed copy of neco and its packaged configs can be found.
"""

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The settings of the two-step run: small crops and heads, no evaluation (the quickstart's own starting
# checkpoint, a package asset, is loaded as the backbone).
TINY = ["experiment=quickstart", "debug=fast", "data=synthetic", "max_steps=2", "logger.progress=false",
        "data.batch_size=2", "data.global_size=32", "data.local_size=16", "loss.roi_size=3",
        "loss.head.hidden_dim=32", "loss.head.out_dim=16"]


def _packaged_sources(dest: Path) -> Path:
    """The files a build of the checkout reads, copied so that the build writes nothing into the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "local")
    shutil.copytree(ROOT / "neco", dest / "neco", ignore=skip)
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=skip)
    # A machine's own data paths (untracked, read when present) must not end up in a wheel.
    (dest / "conf" / "paths" / "local").mkdir()
    (dest / "conf" / "paths" / "local" / "default.yaml").write_text("data: /this/machine/only\n")
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, python of a fresh environment holding only that wheel's neco, an empty working folder)."""
    base = tmp_path_factory.mktemp("install")
    source = _packaged_sources(base / "source")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(base / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((base / "dist").glob("neco-*.whl"))

    venv.create(base / "env", with_pip=False)
    python = base / "env" / "bin" / "python"
    env_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(env_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = base / "work"
    work.mkdir()
    return wheel, python, work


def run_installed(installed, *args, timeout=300):
    _, python, work = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("NECO_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(python), *args], cwd=work, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_wheel_holds_every_config_and_module_but_no_local_paths(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"neco/conf/train.yaml", "neco/conf/experiment/quickstart.yaml", "neco/conf/hydra/help/train.yaml",
            "neco/assets/vit_tiny_synthetic.pt"} <= names
    configs = {f"neco/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
               if "local" not in p.relative_to(ROOT / "conf").parts}
    assert configs <= names, sorted(configs - names)
    # The package list in pyproject.toml is explicit: a new subpackage must be added there.
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "neco").rglob("*.py")}
    assert modules <= names, f"not in the wheel (add to [tool.setuptools] packages): {sorted(modules - names)}"
    assert not [n for n in names if n.startswith("neco/conf/paths/local")]


def test_installed_package_reads_its_own_configs(installed):
    _, python, work = installed
    proc = run_installed(installed, "-c", "import neco, neco.project; print(neco.__file__); "
                                          "print(neco.project.conf_dir())")
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, conf = proc.stdout.split()
    env = python.parent.parent
    assert Path(module).is_relative_to(env), module
    assert Path(conf) == Path(module).parent / "conf"
    assert not Path(module).is_relative_to(ROOT)


def test_installed_train_composes_the_quickstart_from_another_folder(installed):
    proc = run_installed(installed, "-m", "neco.train", "experiment=quickstart", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run_name: quickstart" in proc.stdout
    assert "roi_size: 4" in proc.stdout  # from experiment/quickstart.yaml, not the defaults


# Each command's help template is a packaged config, and lists the options of the packaged config groups.
# Every name below appears only in a generated option list (neco.data.prepare's help has none).
HELP = {"neco.train": "neco_config_dev", "neco.eval": "dinov2_vitg14_reg", "neco.export": "timetuning_vits16",
        "neco.launch": "local_cpu, slurm_1gpu", "neco.data.prepare": "", "neco.data.check": "coco_imagenet100"}


@pytest.mark.parametrize("module", sorted(HELP))
def test_installed_help_lists_the_packaged_options(installed, module):
    proc = run_installed(installed, "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"python -m {module}:") and HELP[module] in proc.stdout, proc.stdout[:500]


def test_installed_launch_composes_a_slurm_job(installed):
    code = ("from neco.launch import compose_job; cfg, run_dir, params = compose_job(['hydra/launcher=slurm_4gpu', "
            "'experiment=quickstart']); print(cfg['run_name'], params['gpus_per_node'])")
    proc = run_installed(installed, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["quickstart", "4"]


def test_installed_package_takes_configs_from_a_user_folder(installed, tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nrun_name: from-my-folder\nseed: 17\n")
    (tmp_path / "paths" / "local").mkdir(parents=True)  # a machine's data paths, read when present
    (tmp_path / "paths" / "local" / "default.yaml").write_text("coco: /datasets/coco/images\n")
    by_config_dir = run_installed(installed, "-m", "neco.train", "--config-dir", str(tmp_path),
                                  "experiment=mine", "--cfg", "job")
    assert by_config_dir.returncode == 0, by_config_dir.stderr[-2000:]
    assert "run_name: from-my-folder" in by_config_dir.stdout and "seed: 17" in by_config_dir.stdout
    assert "coco: /datasets/coco/images" in by_config_dir.stdout
    by_search_path = run_installed(installed, "-m", "neco.train", f"hydra.searchpath=[file://{tmp_path}]",
                                   "experiment=mine", "seed=3", "--cfg", "job")
    assert by_search_path.returncode == 0, by_search_path.stderr[-2000:]
    assert "run_name: from-my-folder" in by_search_path.stdout and "seed: 3" in by_search_path.stdout


def test_installed_train_runs_two_steps_from_another_folder(installed, tmp_path):
    out = tmp_path / "out"
    proc = run_installed(installed, "-m", "neco.train", *TINY, "run_name=installed", f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "runs" / "installed"
    assert (run / "checkpoints" / "last.pt").is_file(), sorted(p.name for p in out.rglob("*"))
    config = (run / "config.yaml").read_text()
    assert "max_steps: 2" in config
    _, python, _ = installed
    # The starting checkpoint is the installed package's asset.
    assert f"weights: {python.parent.parent}/lib/" in config and "/neco/assets/vit_tiny_synthetic.pt" in config
