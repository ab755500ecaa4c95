"""neco.loss.sorting against the diffsort 0.2.0 reference implementation (the oracle) and basic invariants."""

from __future__ import annotations

import math
from functools import cache

import diffsort.functional
import pytest
import torch
from diffsort import DiffSortNet

from neco.loss.sorting import (
    DISTRIBUTIONS,
    SORT_NETWORKS,
    diff_sort,
    diff_sort_dense,
    sorting_network,
)

# (n, steepness): powers of two, odd sizes, padded bitonic sizes that diffsort does (49) and does not (22,
# 54) sort; the steepness values rotate so the grid stays fast, with 100 (NeCo's setting) on the key sizes.
CASES = (
    tuple((n, 100.0) for n in (2, 5, 11, 22, 49, 54, 64))
    + tuple((n, 10.0) for n in (4, 7, 16, 37, 49))
    + tuple((n, 1.0) for n in (3, 8, 33))
)
SIZES = tuple(sorted({n for n, _ in CASES}))
HARD = 1e8  # every comparator saturates to exactly 0 or 1 for inputs at least 1 apart (logistic)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads cost far more than they save, badly so on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of typical, tied and nearly tied values, so flat and steep comparator regions are both hit."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(3, n, generator=g, dtype=torch.float64)
    ties = torch.randint(0, max(2, n // 3), (1, n), generator=g).to(torch.float64)
    close = 1e-3 * torch.randn(1, n, generator=g, dtype=torch.float64)
    return torch.cat([normal, ties, close]).to(dtype)


def _diffsort(x, network, steepness, distribution, art_lambda=0.25):
    return DiffSortNet(
        network, x.shape[1], steepness=steepness, distribution=distribution, art_lambda=art_lambda
    )(x)


def _run(fn, x, probe_v, probe_m, **kwargs):
    """Values, matrix and d/dx of a fixed random linear functional of both outputs."""
    x = x.detach().clone().requires_grad_(True)
    values, matrix = fn(x, **kwargs)
    ((values * probe_v).sum() + (matrix * probe_m).sum()).backward()
    return values.detach(), matrix.detach(), x.grad


def _close(actual, expected, tol, what):
    # Gradients reach ~steepness * n in size, so the absolute part of the tolerance scales with them.
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _compare(network, distribution, dtype, val_tol, grad_tol, art_lambda=0.25, cases=CASES, seed=0):
    for n, steepness in cases:
        x = _inputs(n, dtype, seed + n)
        g = torch.Generator().manual_seed(seed + 1000 + n)
        probe_v = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        probe_m = torch.randn(x.shape + (n,), generator=g, dtype=torch.float64).to(dtype)
        kw = dict(network=network, steepness=steepness, distribution=distribution, art_lambda=art_lambda)
        if grad_tol is None:
            ours, ref = diff_sort(x, **kw), _diffsort(x, **kw)
        else:
            ours, ref = _run(diff_sort, x, probe_v, probe_m, **kw), _run(_diffsort, x, probe_v, probe_m, **kw)
        where = f"{network}/{distribution} n={n} steepness={steepness}"
        assert ours[0].dtype == ours[1].dtype == dtype
        assert ours[1].shape == (x.shape[0], n, n)
        _close(ours[0], ref[0], val_tol, f"values {where}")
        _close(ours[1], ref[1], val_tol, f"matrix {where}")
        if grad_tol is not None:
            _close(ours[2], ref[2], grad_tol, f"gradient {where}")


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_float64_matches_diffsort(network, distribution):
    # diffsort's hand-written gaussian backward evaluates the density with sigma rounded to float32; ours is
    # the exact derivative. With (x / sigma)^2 up to ~25 in the exponent that moves gradients by ~1e-6 of
    # their scale, so they get a looser tolerance here and an exact check in the next test.
    grad_tol = 1e-6 if distribution == "gaussian" else 1e-10
    _compare(network, distribution, torch.float64, val_tol=1e-10, grad_tol=grad_tol)


@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_gaussian_gradients_match_diffsort_with_exact_sigma(network, monkeypatch):
    class ExactNormalCDF:
        @staticmethod
        def apply(v, sigma):
            return 0.5 + 0.5 * torch.erf(v / sigma / math.sqrt(2))

    monkeypatch.setattr(diffsort.functional, "NormalCDF", ExactNormalCDF)
    _compare(network, "gaussian", torch.float64, val_tol=1e-10, grad_tol=1e-10)


@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_logistic_phi_other_lambda(network):
    # At an exact tie the slope of logistic_phi is steepness / 1e-10^lambda (1e7 at lambda = 0.5), so the
    # gradient sums of the tied row cancel heavily and agree only to ~1e-9 of their scale.
    _compare(network, "logistic_phi", torch.float64, val_tol=1e-10, grad_tol=1e-8, art_lambda=0.5)


@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_float32_matches_diffsort(network):
    # Steep comparators amplify float32 rounding of (b - a), hence an absolute tolerance.
    cases = [(n, steepness) for n in (2, 7, 22, 49, 64) for steepness in (10.0, 100.0)]
    for distribution in DISTRIBUTIONS:
        _compare(network, distribution, torch.float32, val_tol=2e-4, grad_tol=None, cases=cases, seed=7)


@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_dense_path_equals_sparse_path(network):
    cases = [(5, "cauchy", 10.0), (22, "optimal", 100.0), (49, "logistic_phi", 30.0), (54, "gaussian", 100.0)]
    for n, distribution, steepness in cases:
        x = _inputs(n, torch.float64, n)
        probe_v, probe_m = torch.randn(x.shape, dtype=x.dtype), torch.randn(x.shape + (n,), dtype=x.dtype)
        kw = dict(network=network, steepness=steepness, distribution=distribution)
        sparse = _run(diff_sort, x, probe_v, probe_m, **kw)
        dense = _run(diff_sort_dense, x, probe_v, probe_m, **kw)
        for a, b, what in zip(sparse, dense, ("values", "matrix", "gradient"), strict=True):
            _close(a, b, 1e-10, f"{what} {network} n={n}")


@pytest.mark.parametrize("network", SORT_NETWORKS)
@pytest.mark.parametrize("n", (2, 7, 22, 49))
def test_matrix_is_doubly_stochastic_and_reproduces_values(network, n):
    x = _inputs(n, torch.float64, 3)
    values, X = diff_sort(x, network, steepness=20.0)
    ones = torch.ones(x.shape, dtype=x.dtype)
    torch.testing.assert_close(X.sum(dim=1), ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(X.sum(dim=2), ones, rtol=0, atol=1e-12)
    assert (X >= 0).all()
    torch.testing.assert_close((x.unsqueeze(1) @ X).squeeze(1), values, rtol=0, atol=1e-12)


def _separated_rows(n: int, rows: int = 64) -> torch.Tensor:
    # Values at least 1 apart, so logistic comparators at HARD steepness are exactly 0/1.
    g = torch.Generator().manual_seed(n)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(rows)]).to(torch.float64)


@cache
def _diffsort_sorts(network: str, n: int) -> bool:
    x = _separated_rows(n)
    values, _ = _diffsort(x, network, HARD, "logistic")
    return torch.equal(values, x.sort(dim=1).values)


@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_hard_limit_is_a_sort_where_the_network_sorts(network):
    for n in SIZES:
        x = _separated_rows(n)
        values, X = diff_sort(x, network, HARD, "logistic")
        if _diffsort_sorts(network, n):
            order = x.sort(dim=1)
            assert torch.equal(values, order.values), (network, n)
            # X[r, i, j] = 1 where input i lands at rank j.
            expected = torch.nn.functional.one_hot(order.indices, n).to(x.dtype).transpose(1, 2)
            assert torch.equal(X, expected), (network, n)
        else:
            # Same (imperfect) network as diffsort: same hard result, still a permutation of the input.
            assert torch.equal(values, _diffsort(x, network, HARD, "logistic")[0]), (network, n)
            assert torch.equal(values.sort(dim=1).values, x.sort(dim=1).values), (network, n)


@pytest.mark.parametrize("n", (5, 16, 37, 49, 64))
@pytest.mark.parametrize("network", SORT_NETWORKS)
def test_networks_sort_the_sizes_neco_uses(network, n):
    assert _diffsort_sorts(network, n)


@pytest.mark.parametrize("n", (22, 54))
def test_padded_bitonic_quirk_is_reproduced(n):
    # diffsort's padded bitonic network does not sort every input of these sizes; parity means neither do we.
    assert not _diffsort_sorts("bitonic", n)
    x = _separated_rows(n)
    assert not torch.equal(diff_sort(x, "bitonic", HARD, "logistic")[0], x.sort(dim=1).values)


def test_autocast_bf16_computes_in_float32_and_backpropagates():
    x = torch.randn(6, 49).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        values, X = diff_sort(x, "bitonic", steepness=100.0)
        loss = values.pow(2).sum() + X.diagonal(dim1=1, dim2=2).sum()
    assert values.dtype == X.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all() and x.grad.float().abs().sum() > 0
    # Autocast is disabled inside: same numbers as a plain float32 call on the upcast input.
    ref_values, ref_X = diff_sort(x.detach().float(), "bitonic", steepness=100.0)
    assert torch.equal(values.detach(), ref_values) and torch.equal(X.detach(), ref_X)


def test_half_input_gives_float32():
    values, X = diff_sort(torch.randn(3, 9).half(), "odd_even")
    assert values.dtype == X.dtype == torch.float32


def test_no_grad():
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        values, X = diff_sort(x, "odd_even", steepness=50.0)
        dense_values, _ = diff_sort_dense(x, "odd_even", steepness=50.0)
    assert not values.requires_grad and not X.requires_grad
    torch.testing.assert_close(values, diff_sort(x, "odd_even", steepness=50.0)[0].detach())
    torch.testing.assert_close(dense_values, values, rtol=1e-5, atol=1e-6)


def test_network_description_is_cached_and_matches_diffsort_depth():
    assert sorting_network("bitonic", 49) is sorting_network("bitonic", 49)
    assert len(sorting_network("bitonic", 49)) == 21  # 64 padded wires: 6 blocks, 1 + 2 + ... + 6 layers
    assert len(sorting_network("odd_even", 49)) == 49
    for layer in sorting_network("bitonic", 22):
        # Every wire is written by exactly one comparator; partners pair wires up.
        assert torch.equal(layer.partner[layer.partner], torch.arange(22))
        assert layer.comparator.max().item() == len(layer.first) - 1


def test_single_element_rows():
    x = torch.randn(3, 1)
    values, X = diff_sort(x, "bitonic")
    assert torch.equal(values, x) and torch.equal(X, torch.ones(3, 1, 1))


def test_unknown_options_raise_naming_the_valid_ones():
    with pytest.raises(ValueError, match="odd_even"):
        diff_sort(torch.randn(2, 4), network="merge")
    with pytest.raises(ValueError, match="logistic_phi"):
        diff_sort(torch.randn(2, 4), distribution="laplace")
    with pytest.raises(ValueError, match="bitonic"):
        sorting_network("shell", 4)
    with pytest.raises(ValueError, match="2-D"):
        diff_sort(torch.randn(4))
