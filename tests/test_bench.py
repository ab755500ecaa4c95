"""`python -m neco.bench`: the quick CPU run, the floor loss, and the sorter against float64 (CPU and GPU)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from neco import bench
from neco.loss.sorting import SORT_NETWORKS, diff_sort, diff_sort_dense

ENV_KEYS = {"device", "torch", "triton", "timm", "kind"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    records = bench.main(["--quick", "--out", str(out)])
    return records, out


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, record)


def test_quick_prints_json_lines_with_the_expected_keys(quick_run):
    records, out = quick_run
    lines = out.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed == records
    assert all(ENV_KEYS <= r.keys() for r in parsed)
    assert parsed[0]["kind"] == "env" and parsed[0]["device"].startswith("cpu")
    assert len({(r["device"], r["torch"], r["timm"]) for r in parsed}) == 1

    steps = [r for r in parsed if r["kind"] == "step"]
    expected = {("neco", "sparse"), ("floor", None), ("neco", "dense")}
    assert {(r["objective"], r["sorter"]) for r in steps} == expected
    for r in steps:
        assert r["backbone"] == "vit_tiny" and r["batch"] == 2 and r["precision"] == "fp32"
        _positive(r, "images_per_s", "step_ms")
        assert math.isfinite(r["loss"])
    (ratio,) = [r for r in parsed if r["kind"] == "ratio"]
    _positive(ratio, "time_ratio")

    sorts = [r for r in parsed if r["kind"] == "sort"]
    expected = {(impl, network) for impl in ("sparse", "dense") for network in SORT_NETWORKS}
    assert {(r["impl"], r["network"]) for r in sorts} >= expected
    for r in sorts:
        assert r["n"] == 49 and r["steepness"] == 100.0
        _positive(r, "fwd_bwd_ms", "fwd_ms")

    (loader,) = [r for r in parsed if r["kind"] == "loader"]
    _positive(loader, "images_per_s_with_startup")


def test_table_names_every_measurement(quick_run):
    buffer = io.StringIO()
    bench.print_table(quick_run[0], file=buffer)
    text = buffer.getvalue()
    assert "NeCo/floor" in text and "sort bitonic" in text and "loader" in text


def test_floor_loss_reaches_every_trainable_parameter():
    args = bench.parse_args(["--quick"])
    device = torch.device("cpu")
    cfg = bench.base_config(args)
    cfg.data.global_size = 32
    cfg.data.local_size = 16
    trainer = bench.build_trainer(cfg, device, None, "floor", total_steps=2)
    crops, boxes = bench.random_batch(cfg.data, device)
    loss = trainer.compute_loss(crops, boxes)
    loss.backward()
    named = [(n, p) for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert named
    for name, param in named:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # The optimizer step and the EMA run on it as in training.
    before = [p.detach().clone() for p in trainer.teacher.parameters()]
    trainer._optimizer_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.teacher.parameters(), strict=True))


# ------------------------------------------------------------------------------------ sorter vs float64
def _run(fn, x, probe_v, probe_m, network):
    x = x.detach().clone().requires_grad_(True)
    values, matrix = fn(x, network, 100.0, "cauchy")
    ((values * probe_v).sum() + (matrix * probe_m).sum()).backward()
    return values.detach(), matrix.detach(), x.grad


def _max_error(actual, expected) -> float:
    # Relative to the largest entry: gradients reach ~steepness * n, values and matrices ~1.
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def check_sparse_against_float64_dense(device: torch.device, rows: int, seed: int = 0) -> None:
    """The fast sorter on `device` against the float64 dense reference path on the same device.

    float64 must agree to rounding; float32 (the training dtype) within what steep comparators make of its
    rounding (values and matrices 2e-4 of their scale, as against diffsort; gradients 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    # Cosine similarities lie in [-1, 1]; a few rows of near ties hit the steep part of every comparator.
    x = torch.rand(rows, 49, generator=g, dtype=torch.float64) * 2 - 1
    x[:8] = x[:8, :1] + 1e-4 * torch.randn(8, 49, generator=g, dtype=torch.float64)
    probe_v = torch.randn(rows, 49, generator=g, dtype=torch.float64)
    probe_m = torch.randn(rows, 49, 49, generator=g, dtype=torch.float64)
    x, probe_v, probe_m = x.to(device), probe_v.to(device), probe_m.to(device)
    for network in SORT_NETWORKS:
        reference = _run(diff_sort_dense, x, probe_v, probe_m, network)
        exact = _run(diff_sort, x, probe_v, probe_m, network)
        single = _run(diff_sort, x.float(), probe_v.float(), probe_m.float(), network)
        for what, ref, a, b in zip(("values", "matrix", "gradient"), reference, exact, single, strict=True):
            assert a.dtype == torch.float64 and b.dtype == torch.float32
            assert torch.isfinite(b).all(), (network, what)
            assert _max_error(a, ref) < 1e-10, (network, what, _max_error(a, ref))
            tol = 1e-3 if what == "gradient" else 2e-4
            assert _max_error(b, ref) < tol, (network, what, _max_error(b, ref))


def test_sparse_sorter_matches_float64_dense_on_cpu():
    check_sparse_against_float64_dense(torch.device("cpu"), rows=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_sorter_matches_float64_dense_on_gpu():
    device = torch.device("cuda")
    check_sparse_against_float64_dense(device, rows=3136, seed=1)  # one NeCo sort: 64 images x 49 cells
    # The float64 dense path on the GPU is itself the CPU's to rounding.
    x = torch.rand(256, 49, dtype=torch.float64) * 2 - 1
    for network in SORT_NETWORKS:
        gpu = diff_sort_dense(x.cuda(), network, 100.0)[1].cpu()
        torch.testing.assert_close(gpu, diff_sort_dense(x, network, 100.0)[1], rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sorter_under_bf16_autocast_on_gpu_runs_in_float32():
    x = torch.rand(3136, 49, device="cuda").to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        values, X = diff_sort(x, "bitonic", steepness=100.0)
    assert values.dtype == X.dtype == torch.float32
    X.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    ref_values, ref_X = diff_sort(x.detach().float(), "bitonic", steepness=100.0)
    assert torch.equal(values.detach(), ref_values) and torch.equal(X.detach(), ref_X)
