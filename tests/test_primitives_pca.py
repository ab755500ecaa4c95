"""Standardisation + PCA (neco.eval.primitives.pca): the named variants on hand-made inputs, faiss's own PCA
sample, and every caller's parameters against the outputs its own code computed before the merge."""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from neco.eval.monitors import MONITOR_PCA
from neco.eval.overcluster.protocol import pca_parameters
from neco.eval.primitives.kmeans import faiss_threads
from neco.eval.primitives.pca import Standardizer, standardise_and_project
from neco.eval.quick.evaluate import QUICK_PCA
from neco.eval.unsupervised.clustering import UNSUP_PCA, project_tokens

PRE_MERGE = Path(__file__).parent / "data" / "pca_pre_merge.npz"  # outputs of the implementations pca.py replaced
ROWS_KEPT = np.arange(0, 4500, 9)  # the rows of the saved outputs (the whole table is 4,500 x 4)
DELTA = 2.0**-46  # 1 +- DELTA is exact in float64: std 1.4e-14, between the two constant-dimension tests


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    with faiss_threads(1):
        yield


def feature_table() -> np.ndarray:
    """4,500 rows (above faiss's 1000 * D PCA sample) of 4 dims: two correlated, one alternating 0 / 2e-5 (std
    1e-5, where ``std + 1e-5`` halves the scale), one constant."""
    rng = np.random.default_rng(0)
    n = 4500
    c0 = rng.normal(size=n) * 3 + 1
    c1 = 0.5 * c0 + rng.normal(size=n)
    c2 = np.where(np.arange(n) % 2 == 0, 0.0, 2e-5)
    return np.stack([c0, c1, c2, np.full(n, 3.25)], axis=1).astype(np.float32)


def _chunks(x, rows=1000):
    return lambda: (x[s : s + rows] for s in range(0, len(x), rows))


def _hand_table(n=100):
    alt = np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
    return np.stack([np.full(n, 3.25), 1e-5 + 1e-5 * alt, 1.0 + DELTA * alt], axis=1), alt


# the three columns after standardisation, as multiples of the +-1 pattern (column 0 is constant: always 0)
HAND = {
    "eps": [0.0, 1e-5 / 2e-5, DELTA / (DELTA + 1e-5)],  # std + eps everywhere
    "rounding": [0.0, 1.0, DELTA],  # sklearn: a variance of 2^-92 at mean 1 is within rounding -> scale 1
    "threshold": [0.0, 1.0, 1.0],  # std 1.4e-14 is above 10 * eps64 = 2.2e-15 -> scaled
}


@pytest.mark.parametrize("rule", sorted(HAND))
def test_each_constant_dimension_rule_on_a_hand_made_table(rule):
    x, alt = _hand_table()
    out = Standardizer(rule, 1e-5, "float64").fit(lambda: [x]).transform(x).astype(np.float64)
    want = np.outer(alt, HAND[rule])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=0)


def test_the_three_rules_give_different_outputs():
    x, _ = _hand_table()
    outs = {r: Standardizer(r, 1e-5, "float64").fit(lambda: [x]).transform(x) for r in HAND}
    for a in outs:
        for b in outs:
            if a < b:
                assert np.abs(outs[a] - outs[b]).max() > 1e-3, (a, b)


@pytest.mark.parametrize("rule", sorted(HAND))
def test_float32_precision_applies_the_same_rules(rule):
    x, alt = _hand_table()
    x = x[:, :2].astype(np.float32)  # 1 +- 2^-46 is not a float32 column
    out = Standardizer(rule, 1e-5, "float32").fit(lambda: [x]).transform(x)
    np.testing.assert_allclose(out, np.outer(alt, HAND[rule][:2]), rtol=1e-5, atol=1e-6)


def test_float32_and_float64_precision_agree_to_float32_rounding():
    x = feature_table()[:, :2]
    a = Standardizer("eps", 1e-5, "float32").fit(_chunks(x)).transform(x)
    b = Standardizer("eps", 1e-5, "float64").fit(_chunks(x)).transform(x)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="constant_dims"):
        Standardizer("sklearn")
    with pytest.raises(ValueError, match="eps must be > 0"):
        Standardizer("eps", 0.0)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_faiss_sample_is_the_pca_faiss_fits_on_every_row(precision):
    x = feature_table()[:, :3]  # 4,500 rows > 1000 * 3: faiss subsamples
    scaler = Standardizer("rounding", precision=precision).fit(_chunks(x))
    z = np.ascontiguousarray(scaler.transform(x))
    pca = faiss.PCAMatrix(3, 2)
    pca.train(z)  # faiss draws its own 3,000 rows
    got = standardise_and_project(_chunks(x), len(x), 3, 2, constant_dims="rounding", precision=precision)
    assert np.array_equal(got, pca.apply(z))
    first = faiss.PCAMatrix(3, 2)
    first.train(np.ascontiguousarray(z[:3000]))  # the same number of rows, but not faiss's: another projection
    assert not np.array_equal(first.apply(z), got)


def test_full_rank_pca_rotates_instead_of_skipping():
    x = feature_table()[:500, :2]
    plain = standardise_and_project(_chunks(x), 500, 2, 2, constant_dims="threshold", precision="float64")
    np.testing.assert_array_equal(plain, Standardizer("threshold", precision="float64").fit(_chunks(x)).transform(x))
    rotated = standardise_and_project(_chunks(x), 500, 2, 2, constant_dims="threshold", precision="float64",
                                      full_rank_pca=True)
    assert np.abs(rotated - plain).max() > 0.1
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(plain, axis=1), rtol=1e-4, atol=1e-4)


def test_apply_rows_projects_consecutive_blocks_across_chunk_boundaries():
    x = feature_table()[:, :3]
    params = dict(constant_dims="threshold", precision="float64")
    got = standardise_and_project(_chunks(x, 700), len(x), 3, 2, **params, apply_rows=1000)
    z = Standardizer(**params).fit(_chunks(x, 700)).transform(x)
    pca = faiss.PCAMatrix(3, 2)
    pca.train(z)
    want = np.concatenate([pca.apply(np.ascontiguousarray(z[s : s + 1000])) for s in range(0, len(z), 1000)])
    assert np.array_equal(got, want)
    per_chunk = standardise_and_project(_chunks(x, 700), len(x), 3, 2, **params)
    np.testing.assert_allclose(per_chunk, got, rtol=0, atol=1e-5)  # the same projection, up to rounding


# ------------------------------------------------------------------ callers against their earlier implementations

def _caller_output(caller: str, params: dict | None = None) -> np.ndarray:
    x = feature_table()
    n, d = x.shape
    if caller == "unsup" and params is None:
        t = torch.from_numpy(x)
        parts = [t[:3000].reshape(30, 10, 10, d), t[3000:].reshape(15, 10, 10, d)]  # train and val images
        return project_tokens(parts, 2).reshape(-1, 2).numpy()
    defaults = {"overcluster": (pca_parameters(0.0), None), "monitor": (MONITOR_PCA, 4_000_000),
                "quick": (QUICK_PCA, None), "unsup": (UNSUP_PCA, None)}
    own, max_points = defaults[caller]
    source = (lambda: [x]) if caller == "quick" else _chunks(x)
    return standardise_and_project(source, n, d, 2, pca_max_points=max_points, **(params or own))


def _close_up_to_sign(got: np.ndarray, saved: np.ndarray) -> bool:
    sign = np.sign((got * saved).sum(axis=0))  # a principal axis is defined up to its sign
    return bool(np.abs(got * sign - saved).max() <= 1e-5)


@pytest.mark.parametrize("caller", ["quick", "unsup"])
def test_each_caller_reproduces_its_pre_merge_output(caller):
    # Saved from each caller's own earlier implementation (primitives/clustering.py standardise_and_project with
    # std_eps 0 and 1e-5, quick/evaluate.py _standardise_and_project, unsupervised/clustering.py standardise_pca).
    saved = np.load(PRE_MERGE)[caller]
    got = _caller_output(caller)[ROWS_KEPT]
    assert _close_up_to_sign(got, saved)


@pytest.mark.parametrize("caller", ["overcluster", "monitor"])
def test_overcluster_and_monitor_fit_the_pca_the_reference_fits(caller):
    """Their PCA is fitted on faiss's own sample of every standardised row, as the reference scripts hand faiss
    every row (METHOD.md §6.1, §6.2). Their earlier implementation fitted it on another sample (numpy's draw):
    on this table its projection is a different one."""
    x = feature_table()
    params = pca_parameters(0.0) if caller == "overcluster" else MONITOR_PCA
    rule = {k: v for k, v in params.items() if k in ("constant_dims", "eps", "precision")}
    z = np.ascontiguousarray(Standardizer(**rule).fit(_chunks(x)).transform(x))
    pca = faiss.PCAMatrix(4, 2)
    pca.train(z)  # every row: faiss draws its own 4,000
    got = _caller_output(caller)
    assert np.array_equal(got, pca.apply(z))
    assert not _close_up_to_sign(got[ROWS_KEPT], np.load(PRE_MERGE)[caller])


# Another caller's parameters do not pass for it: the comparison above can fail.
WRONG = {
    "overcluster": MONITOR_PCA,  # eps instead of the rounding rule
    "monitor": pca_parameters(0.0),  # the rounding rule instead of eps
    "quick": pca_parameters(0.0),  # the rounding rule instead of eps
    "unsup": QUICK_PCA,  # eps instead of the threshold rule
}


@pytest.mark.parametrize("caller", sorted(WRONG))
def test_another_callers_parameters_do_not_reproduce_it(caller):
    saved = np.load(PRE_MERGE)[caller]
    assert not _close_up_to_sign(_caller_output(caller, WRONG[caller])[ROWS_KEPT], saved)
