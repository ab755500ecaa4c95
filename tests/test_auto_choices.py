"""Device-dependent defaults: loss.sorter=auto, and run_info.json's record of what every auto setting became.

The CUDA side is tested without a GPU: the resolver is called with a CUDA device while torch.cuda.is_available
and the kernel trial are replaced, and the trial itself runs on CPU tensors (interpreted kernels, or a kernel
replaced by a broken one).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.models.vision_transformer import VisionTransformer

import neco.config  # noqa: F401
from neco.config import TrainConfig
from neco.engine.log import read_metrics
from neco.engine.optim import build_optimizer, param_groups
from neco.engine.resolved import attention_implementation, log_auto_choices, optimizer_implementation
from neco.errors import ConfigError
from neco.loss import sorter_choice
from neco.loss.sorter_choice import resolve_sorter, triton_failure
from neco.loss.sorting import diff_sort
from neco.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TINY = ["experiment=quickstart", "backbone.weights=random", "monitor.name=none", "logger.progress=false",
        "data.batch_size=2", "data.synthetic_images=8", "data.synthetic_size=48", "data.global_size=32",
        "data.local_size=16", "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16",
        "logger.log_every=1", "optim.epochs=2"]


def loss_cfg(**kw):
    base = dict(sorter="auto", network="bitonic", roi_size=7, student_steepness=100.0, distribution="cauchy")
    return SimpleNamespace(**(base | kw))


def small_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0)


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=TINY + [f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture(autouse=True)
def fresh_trials():
    triton_failure.cache_clear()  # the trial is cached per process; each test injects its own outcome
    yield
    triton_failure.cache_clear()


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that reports a CUDA device; `trials` collects the trial's arguments, `outcome[0]` its answer."""
    trials, outcome = [], [None]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def trial(*args):
        trials.append(args)
        return outcome[0]

    monkeypatch.setattr(sorter_choice, "triton_failure", trial)
    return SimpleNamespace(trials=trials, outcome=outcome)


# ---------------------------------------------------------------------------------------------- the default
def test_auto_is_the_default_and_a_valid_choice():
    assert TrainConfig().loss.sorter == "auto"
    assert tiny_cfg("/tmp").loss.sorter == "auto"


def test_auto_takes_sparse_on_the_cpu_without_trying_triton(monkeypatch):
    monkeypatch.setattr(sorter_choice, "triton_failure", lambda *a: pytest.fail("no trial off CUDA"))
    choice = resolve_sorter(loss_cfg(), CPU)
    assert (choice.value, choice.reason) == ("sparse", "no CUDA device: the run is on cpu")
    assert resolve_sorter(loss_cfg(), torch.device("mps")).value == "sparse"


def test_auto_takes_sparse_when_cuda_is_not_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sorter_choice, "triton_failure", lambda *a: pytest.fail("no trial without CUDA"))
    assert resolve_sorter(loss_cfg(), CUDA).value == "sparse"


def test_auto_takes_triton_on_cuda_where_the_trial_passes(fake_cuda):
    choice = resolve_sorter(loss_cfg(network="odd_even", roi_size=5, student_steepness=30), CUDA)
    assert choice.value == "triton" and "CUDA" in choice.reason
    # the trial sorts rows of the run's size with the run's network, steepness and distribution
    assert fake_cuda.trials == [(CUDA, "odd_even", 25, 30.0, "cauchy")]
    assert choice.record() == {"requested": "auto", "value": "triton", "reason": choice.reason}


def test_auto_takes_sparse_on_cuda_where_the_trial_fails(fake_cuda):
    fake_cuda.outcome[0] = "the Triton kernels failed on cuda:0 (RuntimeError: ptxas fatal)"
    choice = resolve_sorter(loss_cfg(), CUDA)
    assert (choice.value, choice.reason) == ("sparse", fake_cuda.outcome[0])


def test_auto_takes_sparse_on_cuda_for_a_distribution_without_kernel(fake_cuda):
    choice = resolve_sorter(loss_cfg(distribution="gaussian"), CUDA)
    assert choice.value == "sparse" and "loss.distribution=gaussian has no Triton kernel" in choice.reason
    assert fake_cuda.trials == []


def test_auto_takes_sparse_on_cuda_when_the_kernels_do_not_import(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "neco.loss.triton_sort", None)  # importing it raises ImportError
    choice = resolve_sorter(loss_cfg(), CUDA)
    assert choice.value == "sparse" and choice.reason.startswith("the Triton kernels do not import")


def test_explicit_sorters_are_kept(fake_cuda):
    for sorter in ("sparse", "dense"):
        assert resolve_sorter(loss_cfg(sorter=sorter), CUDA).record() == {"requested": sorter, "value": sorter}
    assert resolve_sorter(loss_cfg(sorter="triton"), CUDA).value == "triton"
    assert len(fake_cuda.trials) == 1  # only triton is tried


def test_explicit_triton_that_cannot_run_names_the_setting_to_use(fake_cuda):
    fake_cuda.outcome[0] = "triton is not installed"
    with pytest.raises(ConfigError) as err:
        resolve_sorter(loss_cfg(sorter="triton"), CUDA)
    message = str(err.value)
    assert message.startswith("loss.sorter=triton cannot run here: triton is not installed;")
    assert "set loss.sorter=auto" in message and "loss.sorter=sparse" in message and "\n" not in message


def test_explicit_triton_on_the_cpu_is_refused_by_the_real_check(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"loss.sorter=triton cannot run here: .*cpu.*set loss.sorter=auto"):
        resolve_sorter(loss_cfg(sorter="triton"), CPU)


# ------------------------------------------------------------------------------------------------ the trial
@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The kernel module, with the CPU allowed, so that the trial runs whatever kernel the test puts in."""
    triton_sort = pytest.importorskip("neco.loss.triton_sort")
    monkeypatch.setattr(triton_sort, "unavailable_reason", lambda device: None)
    return triton_sort


def test_trial_passes_a_kernel_that_agrees(kernels_on_cpu, monkeypatch):
    monkeypatch.setattr(kernels_on_cpu, "triton_diff_sort", diff_sort)
    assert triton_failure(CPU, "bitonic", 49, 100.0, "cauchy") is None


def test_trial_accepts_float32_rounding_at_high_steepness(kernels_on_cpu, monkeypatch):
    """A kernel as exact as float32 allows, here the sparse path run in float64 and rounded, passes even where
    rounding moves the gradients by far more than 1e-2 in absolute terms."""
    def rounded(x, **kwargs):
        values, perm = diff_sort(x.double(), **kwargs)
        return values.float(), perm.float()

    monkeypatch.setattr(kernels_on_cpu, "triton_diff_sort", rounded)
    assert triton_failure(CPU, "bitonic", 49, 1000.0, "cauchy") is None


def test_trial_catches_a_kernel_that_raises(kernels_on_cpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: unsupported architecture\nmore detail")

    monkeypatch.setattr(kernels_on_cpu, "triton_diff_sort", broken)
    assert triton_failure(CPU, "bitonic", 49, 100.0, "cauchy") == (
        "the Triton kernels failed on cpu (RuntimeError: ptxas fatal: unsupported architecture)")


@pytest.mark.parametrize("fault", ["values", "matrix", "gradient", "nan"])
def test_trial_catches_a_kernel_that_computes_something_else(kernels_on_cpu, monkeypatch, fault):
    def wrong(x, **kwargs):
        values, perm = diff_sort(x, **kwargs)
        if fault == "values":
            return values + 0.1, perm
        if fault == "matrix":
            return values, perm.flip(-1)
        if fault == "gradient":  # right values, twice the derivative
            return values + (values - values.detach()), perm
        return values * float("nan"), perm

    monkeypatch.setattr(kernels_on_cpu, "triton_diff_sort", wrong)
    reason = triton_failure(CPU, "bitonic", 49, 100.0, "cauchy")
    assert reason is not None and reason.startswith("the Triton kernels disagree with the sparse sorter on cpu")


def test_trial_passes_the_real_kernels_interpreted():
    pytest.importorskip("triton")
    code = ("import torch; from neco.loss.sorter_choice import triton_failure; "
            "print(repr([triton_failure(torch.device('cpu'), n, 49, 100.0, d) "
            "for n, d in (('bitonic', 'cauchy'), ('odd_even', 'logistic'))]))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[None, None]"


# ----------------------------------------------------------------------------------- the other auto choices
def test_optimizer_implementation_follows_the_device():
    vit = small_vit()
    cfg = tiny_cfg("/tmp").optim
    groups = param_groups(vit, torch.nn.Linear(2, 2), cfg)
    assert optimizer_implementation(build_optimizer(groups, cfg, CPU)) == "foreach"
    # the fused kernel is asked for on CUDA (recent PyTorch also builds it for CPU tensors, which lets this
    # be checked here)
    assert optimizer_implementation(build_optimizer(groups, cfg, CUDA)) == "fused"


def test_attention_implementation_reads_the_blocks():
    vit = small_vit()
    assert attention_implementation(vit) == "sdpa"  # timm's default
    vit.blocks[0].attn.fused_attn = False
    assert attention_implementation(vit) == "mixed"
    for block in vit.blocks:
        block.attn.fused_attn = False
    assert attention_implementation(vit) == "eager"


def test_only_settings_left_at_auto_are_logged(caplog):
    block = {"loss.sorter": {"requested": "auto", "value": "sparse", "reason": "no CUDA device: the run is on cpu"},
             "precision": {"requested": "bf16", "value": "bf16"}, "attention": {"value": "sdpa"}}
    with caplog.at_level(logging.INFO, logger="neco"):
        log_auto_choices(block)
    assert [r.getMessage() for r in caplog.records] == [
        "loss.sorter=auto -> sparse (no CUDA device: the run is on cpu)"]


# ------------------------------------------------------------------------------------------------ training
def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_auto_on_the_cpu_trains_bitwise_as_sparse_and_is_recorded(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="neco"):
        train(tiny_cfg(tmp_path, "max_steps=3"), tmp_path / "auto")
    train(tiny_cfg(tmp_path, "max_steps=3", "loss.sorter=sparse"), tmp_path / "sparse")
    auto, sparse = _losses(tmp_path / "auto"), _losses(tmp_path / "sparse")
    assert len(auto) == 3 and auto == sparse
    resolved = json.loads((tmp_path / "auto" / "run_info.json").read_text())["resolved"]
    assert resolved["loss.sorter"] == {"requested": "auto", "value": "sparse",
                                       "reason": "no CUDA device: the run is on cpu"}
    assert resolved["device"] == {"requested": "auto", "value": "cpu"}
    assert resolved["precision"] == {"requested": "auto", "value": "fp32"}
    assert resolved["optimizer"]["value"] == "foreach" and resolved["attention"] == {"value": "sdpa"}
    explicit = json.loads((tmp_path / "sparse" / "run_info.json").read_text())["resolved"]["loss.sorter"]
    assert explicit == {"requested": "sparse", "value": "sparse"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss.sorter=auto")]
    assert lines == ["loss.sorter=auto -> sparse (no CUDA device: the run is on cpu)"]


def test_a_sparse_checkpoint_resumes_under_auto(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path, "max_steps=2", "loss.sorter=sparse"), run)
    result = train(tiny_cfg(tmp_path, "max_steps=3"), run)  # the default, auto; refused if the key were kept
    assert result["step"] == 3
    resume = json.loads((run / "run_info.json").read_text())["resumes"][-1]
    assert resume["changed"] == {"loss.sorter": ["sparse", "auto"], "max_steps": [2, 3]} and resume["forced"] == {}


def test_explicit_triton_on_the_cpu_is_one_line_before_anything_is_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "neco.train", *TINY, "max_steps=1", "device=cpu",
                           "loss.sorter=triton", f"paths.output_dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert lines[0].startswith("error: loss.sorter=triton cannot run here: ")
    assert "set loss.sorter=auto" in lines[0]
    assert not list(tmp_path.rglob("run_info.json")) and not list(tmp_path.rglob("*.pt"))


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_takes_triton_on_a_real_gpu():
    pytest.importorskip("triton")
    choice = resolve_sorter(loss_cfg(), CUDA)
    assert choice.value == "triton", choice.reason
