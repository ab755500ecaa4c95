"""neco.loss.triton_sort against the sparse sorter, itself diffsort 0.2.0's function (tests/test_sorting.py).

On CPU the kernels run under the Triton interpreter in a subprocess: TRITON_INTERPRET must be set before the
kernels are defined, and must not reach this process's other tests (a GPU run would interpret every kernel).
The subprocess is this file run as a script; it prints one JSON line of errors that the tests below check.
Marked `gpu`: the compiled kernels on CUDA at NeCo's size, 3,136 rows of 49.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neco.loss.pair import pair_loss, soft_permutation
from neco.loss.sorting import SORT_NETWORKS, diff_sort, diff_sort_dense

ROOT = Path(__file__).resolve().parents[1]
FLOAT64_TOL = 1e-10
FLOAT32_TOL = {"values": 2e-4, "matrix": 2e-4, "gradient": 1e-3}  # against float64, relative to the scale


def _case(network, n, dtype="float64", distribution="cauchy", exchange=None, rows=16, grads="both", per=None):
    return {"network": network, "n": n, "dtype": dtype, "distribution": distribution, "exchange": exchange,
            "rows": rows, "grads": grads, "per": per, "steepness": 10.0 if n <= 5 else 100.0}


# Interpreted cases: cost grows with layers, not rows (up to 64 rows share one program there).
CASES = {
    **{f"{net}-{n}": _case(net, n) for net in SORT_NETWORKS for n in (1, 2, 5, 16, 49)},
    "bitonic-8-values-only": _case("bitonic", 8, grads="values"),
    "odd_even-8-matrix-only": _case("odd_even", 8, grads="matrix"),
    "bitonic-49-float32": _case("bitonic", 49, dtype="float32"),
    "bitonic-5-logistic": _case("bitonic", 5, distribution="logistic"),
    "odd_even-5-reciprocal": _case("odd_even", 5, distribution="reciprocal"),
    "bitonic-7-optimal": _case("bitonic", 7, distribution="optimal"),
    "bitonic-16-scratch": _case("bitonic", 16, exchange="scratch"),
    "odd_even-8-scratch": _case("odd_even", 8, exchange="scratch"),
    # One row per program, as a GPU runs n = 49: here two programs.
    "bitonic-16-one-row-per-program": _case("bitonic", 16, rows=2, per=1),
}


def _inputs(rows: int, n: int, seed: int) -> torch.Tensor:
    """Cosine-like rows in [-1, 1], with rows of exact ties and of near ties (the steep part of f)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=g, dtype=torch.float64) * 2 - 1
    x[1::4] = torch.randint(0, max(2, n // 3), (len(x[1::4]), n), generator=g).to(torch.float64) / n
    x[2::4] = x[2::4, :1] + 1e-4 * torch.randn(len(x[2::4]), n, generator=g, dtype=torch.float64)
    return x


def _run(fn, x, probe_v, probe_m, grads="both", **kwargs):
    """Values, matrix and d/dx of a random linear functional of the outputs (both, or only one of them)."""
    x = x.detach().clone().requires_grad_(True)
    values, matrix = fn(x, **kwargs)
    loss = 0
    if grads in ("both", "values"):
        loss = loss + (values * probe_v).sum()
    if grads in ("both", "matrix"):
        loss = loss + (matrix * probe_m).sum()
    loss.backward()
    return values.detach(), matrix.detach(), x.grad


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # Relative to the largest entry: gradients reach ~steepness * n, values and matrices ~1.
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def compare(spec: dict, device: torch.device, seed: int = 0) -> dict:
    """Errors of the Triton sorter against the sparse sorter run in float64 on the same inputs."""
    from neco.loss.triton_sort import triton_diff_sort

    dtype = getattr(torch, spec["dtype"])
    rows, n = spec["rows"], spec["n"]
    g = torch.Generator().manual_seed(seed + 1)
    x = _inputs(rows, n, seed).to(device)
    probe_v = torch.randn(rows, n, generator=g, dtype=torch.float64).to(device)
    probe_m = torch.randn(rows, n, n, generator=g, dtype=torch.float64).to(device)
    kw = dict(network=spec["network"], steepness=spec["steepness"], distribution=spec["distribution"])
    reference = _run(diff_sort, x, probe_v, probe_m, spec["grads"], **kw)
    ours = _run(triton_diff_sort, x.to(dtype), probe_v.to(dtype), probe_m.to(dtype), spec["grads"],
                exchange=spec["exchange"], **kw)
    out = {what: _error(a, b) for what, a, b in zip(("values", "matrix", "gradient"), ours, reference, strict=True)}
    out["dtypes"] = [str(t.dtype).replace("torch.", "") for t in ours]
    out["finite"] = all(bool(torch.isfinite(t).all()) for t in ours)
    return out


def _pair_losses(device: torch.device, sorter: str) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    student, teacher, refs = (torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    student.requires_grad_(True)
    loss = pair_loss(student, teacher, refs, 100.0, 140.0, sorter=sorter)
    loss.backward()
    return loss.item(), student.grad


def pair_loss_errors(device: torch.device) -> dict:
    (sparse, g_sparse), (ours, g_ours) = _pair_losses(device, "sparse"), _pair_losses(device, "triton")
    return {"loss": abs(ours - sparse) / abs(sparse), "gradient": _error(g_ours, g_sparse)}


def _interpreted_main() -> None:
    import neco.loss.triton_sort as ts

    assert ts.INTERPRETED, "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    launch, results = ts._launch, {}
    for name, spec in CASES.items():
        per = spec["per"]
        ts._launch = launch if per is None else lambda slots, rows, backward, per=per: (per, -(-rows // per), 4)
        results[name] = compare(spec, torch.device("cpu"))
    ts._launch = launch
    results["pair_loss"] = pair_loss_errors(torch.device("cpu"))
    print(json.dumps(results))


# ------------------------------------------------------------------------------------- CPU, interpreted
@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(errors: dict, dtype: str, what: str) -> None:
    assert errors["finite"], (what, errors)
    assert errors["dtypes"] == [dtype] * 3, (what, errors)
    for key in ("values", "matrix", "gradient"):
        tol = FLOAT64_TOL if dtype == "float64" else FLOAT32_TOL[key]
        assert errors[key] < tol, (what, key, errors)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_sparse_sorter(interpreted, name):
    _check(interpreted[name], CASES[name]["dtype"], name)


def test_interpreted_pair_loss_with_triton_sorter_matches_sparse(interpreted):
    errors = interpreted["pair_loss"]
    assert errors["loss"] < 1e-12 and errors["gradient"] < FLOAT64_TOL, errors


def test_kernels_compile_for_an_h100():
    """The interpreter checks the arithmetic, not the GPU lowering: compile the float32 kernels for sm_90 with
    the ptxas that ships in the Triton wheel (no GPU needed), as the default exchange and launch use them."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import neco.loss.triton_sort as ts

    if ts.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted")
    launches = ((ts._sort_fwd, {}, False), (ts._sort_bwd, {"HAS_GXS": True, "HAS_GX": True}, True))
    for kernel, flags, backward in launches:
        per, _, warps = ts._launch(64, 3136, backward)
        constexprs = {"R": per, "S": 64, "DIST": 0, "GATHER": ts.DEFAULT_EXCHANGE == "gather", **flags}
        names = kernel.arg_names
        signature = {a: "constexpr" if a in constexprs else "*i32" if a == "tab_ptr" else
                     "*fp32" if a.endswith("_ptr") else "i32" for a in names}
        source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert compiled.asm["cubin"], kernel


# ---------------------------------------------------------------------------------------- dispatch
def test_cpu_tensor_without_interpreter_is_refused_naming_the_option():
    pytest.importorskip("triton")
    from neco.loss.triton_sort import INTERPRETED, triton_diff_sort

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are allowed")
    with pytest.raises(ValueError, match="loss.sorter=triton.*CUDA"):
        triton_diff_sort(torch.randn(3, 5))
    maps = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="loss.sorter"):
        soft_permutation(maps, maps, 100.0, sorter="triton")


def test_missing_triton_is_refused_naming_the_option(monkeypatch):
    import neco.loss.triton_sort as ts

    monkeypatch.setattr(ts, "triton", None)
    assert "not installed" in ts.unavailable_reason(torch.device("cuda"))
    with pytest.raises(ValueError, match="loss.sorter=triton.*not installed"):
        ts.triton_diff_sort(torch.randn(3, 5))


def test_unknown_sorter_is_refused_naming_the_option():
    maps = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="loss.sorter='fast'.*triton"):
        soft_permutation(maps, maps, 100.0, sorter="fast")


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("exchange", ("gather", "scratch"))
@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_kernels_match_float64_reference_on_gpu(network, exchange):
    from neco.loss.triton_sort import triton_diff_sort

    device = torch.device("cuda")
    rows, n = 3136, 49  # one NeCo sort: 64 images x 49 cells
    x = _inputs(rows, n, seed=1).to(device)
    g = torch.Generator().manual_seed(2)
    probe_v = torch.randn(rows, n, generator=g, dtype=torch.float64).to(device)
    probe_m = torch.randn(rows, n, n, generator=g, dtype=torch.float64).to(device)
    kw = dict(network=network, steepness=100.0, distribution="cauchy")
    reference = _run(diff_sort_dense, x, probe_v, probe_m, **kw)
    exact = _run(triton_diff_sort, x, probe_v, probe_m, exchange=exchange, **kw)
    single = _run(triton_diff_sort, x.float(), probe_v.float(), probe_m.float(), exchange=exchange, **kw)
    for what, ref, a, b in zip(("values", "matrix", "gradient"), reference, exact, single, strict=True):
        assert a.dtype == torch.float64 and b.dtype == torch.float32
        assert torch.isfinite(b).all(), (network, what)
        assert _error(a, ref) < FLOAT64_TOL, (network, exchange, what, _error(a, ref))
        assert _error(b, ref) < FLOAT32_TOL[what], (network, exchange, what, _error(b, ref))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_sorter_in_pair_loss_and_under_autocast_on_gpu():
    from neco.loss.triton_sort import triton_diff_sort

    errors = pair_loss_errors(torch.device("cuda"))
    assert errors["loss"] < 1e-12 and errors["gradient"] < FLOAT64_TOL, errors
    x = torch.rand(3136, 49, device="cuda").to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        values, X = triton_diff_sort(x, "bitonic", steepness=100.0)
    assert values.dtype == X.dtype == torch.float32
    X.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    ref_values, ref_X = triton_diff_sort(x.detach().float(), "bitonic", steepness=100.0)
    assert torch.equal(values.detach(), ref_values) and torch.equal(X.detach(), ref_X)


if __name__ == "__main__":
    _interpreted_main()
