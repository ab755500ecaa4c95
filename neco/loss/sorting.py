"""Differentiable sorting networks: a relaxed ascending sort of each row plus its soft permutation matrix.

``diff_sort(x)`` runs a sorting network (bitonic or odd-even transposition) on every row of ``x`` with each
hard comparator replaced by a soft one: for wires holding ``a`` and ``b`` it computes
``alpha = f(steepness * (b - a))`` for a CDF-like ``f`` and outputs ``min = alpha * a + (1 - alpha) * b`` and
``max = (1 - alpha) * a + alpha * b``. The same mixing applied to the columns of an identity matrix gives
``X``, with ``X[r, i, j]`` the mass of input ``i`` at rank ``j``, so that ``x_sorted = x @ X``.

It is numerically the function of ``diffsort.DiffSortNet`` (diffsort 0.2.0), quirks included, so results stay
comparable with the reference NeCo implementation:

* a bitonic network on ``n`` wires that is not a power of two is the network of the next power of two with
  the lowest wires dropped; comparators touching a dropped wire become identities. That network does not
  sort every input for some ``n`` (e.g. 22 and 54), and neither does this one.
* within a bitonic block, comparators of descending runs send the min to their higher wire but still compute
  ``alpha`` from ``(upper - lower)``; because ``1 - f(v)`` is not bitwise ``f(-v)``, the orientation is kept.
* float16/bfloat16 inputs are computed in float32 (diffsort upcasts half precision for ``alpha``; here the
  whole network runs in float32, so the results are float32 too).

Two formulations share the network and the ``alpha`` functions: :func:`diff_sort` touches only the two
columns of each comparator, ``O(n^2)`` per row and layer; :func:`diff_sort_dense` multiplies by a dense
``n x n`` matrix per layer, ``O(n^3)``, and serves as the reference path and benchmark baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

SORT_NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")


@dataclass(frozen=True)
class SortLayer:
    """One layer of a sorting network; all of its comparators act at once on disjoint wires.

    Comparator ``c`` reads wires ``first[c] <= second[c]`` and has
    ``alpha_c = f(steepness * (x[second[c]] - x[first[c]]))``. A wire that no real comparator touches in
    this layer gets an identity comparator (``first == second``), whose ``alpha`` is exactly 0.5, so it
    passes its column through unchanged, bit for bit, in values and gradients.

    Per wire ``w``: ``comparator[w]`` is the comparator writing it, ``partner[w]`` the other wire that
    comparator reads (``w`` itself for identities; ``partner`` is an involution) and ``flipped[w]`` is set
    when the comparator sends its min to its second wire. The new column is then
    ``own[w] * col[w] + other[w] * col[partner[w]]`` with ``(own, other) = (alpha, 1 - alpha)``, swapped
    where ``flipped``.
    """

    first: torch.Tensor
    second: torch.Tensor
    comparator: torch.Tensor
    partner: torch.Tensor
    flipped: torch.Tensor
    any_flipped: bool

    def to(self, device: torch.device) -> SortLayer:
        names = ("first", "second", "comparator", "partner", "flipped")
        return replace(self, **{name: getattr(self, name).to(device) for name in names})


def _make_layer(n: int, pairs: list[tuple[int, int, bool]]) -> SortLayer:
    """Build a layer from ``(lower wire, upper wire, min goes to upper)`` comparators on ``n`` wires."""
    first, second = [], []
    comparator, partner, flipped = [0] * n, list(range(n)), [False] * n
    touched = set()
    for lo, hi, flip in pairs:
        for w, other in ((lo, hi), (hi, lo)):
            comparator[w], partner[w], flipped[w] = len(first), other, flip
        touched.update((lo, hi))
        first.append(lo)
        second.append(hi)
    for w in range(n):
        if w not in touched:
            comparator[w] = len(first)
            first.append(w)
            second.append(w)
    return SortLayer(
        first=torch.tensor(first, dtype=torch.long),
        second=torch.tensor(second, dtype=torch.long),
        comparator=torch.tensor(comparator, dtype=torch.long),
        partner=torch.tensor(partner, dtype=torch.long),
        flipped=torch.tensor(flipped, dtype=torch.bool),
        any_flipped=any(flipped),
    )


def _bitonic_layers(n: int) -> list[list[tuple[int, int, bool]]]:
    # Bitonic sort on the next power of two; the lowest `pad` wires are virtual and dropped. Block `b` sorts
    # runs of 2^(b+1) wires, alternately ascending and descending, so the last block yields one ascending run.
    blocks = (n - 1).bit_length()
    size = 1 << blocks
    pad = size - n
    layers = []
    for block in range(blocks):
        for step in range(block + 1):
            half = 1 << (block - step)
            pairs = []
            for lo in range(size):
                hi = lo + half
                if lo & half or lo < pad:
                    # `lo & half`: `lo` is the upper wire of its pair. A comparator with a dropped wire
                    # is an identity on the real one; _make_layer adds those for untouched wires.
                    continue
                descending = bool((lo >> (block + 1)) & 1)
                pairs.append((lo - pad, hi - pad, descending))
            layers.append(pairs)
    return layers


def _odd_even_layers(n: int) -> list[list[tuple[int, int, bool]]]:
    # Odd-even transposition sort: n alternating layers of neighbour comparators, starting at wire 0.
    return [[(lo, lo + 1, False) for lo in range(parity % 2, n - 1, 2)] for parity in range(n)]


_BUILDERS = {"bitonic": _bitonic_layers, "odd_even": _odd_even_layers}


def _check_network(network: str) -> None:
    if network not in SORT_NETWORKS:
        raise ValueError(f"unknown sorting network {network!r}; valid options: {', '.join(SORT_NETWORKS)}")


@lru_cache(maxsize=256)
def sorting_network(network: str, n: int) -> tuple[SortLayer, ...]:
    """The layers of the ``network`` (``"bitonic"`` or ``"odd_even"``) sorting ``n`` wires, on CPU, cached."""
    _check_network(network)
    if n < 1:
        raise ValueError(f"cannot sort rows of length {n}")
    return tuple(_make_layer(n, pairs) for pairs in _BUILDERS[network](n))


@lru_cache(maxsize=64)
def _network_on(network: str, n: int, device: torch.device) -> tuple[SortLayer, ...]:
    # Cached per device so that a GPU caller does not pay a host-to-device copy per layer and call.
    return tuple(layer.to(device) for layer in sorting_network(network, n))


# --- alpha = f(steepness * (b - a)), with d = b - a. The operation order matters for parity with diffsort.


def _logistic(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    return torch.sigmoid(d * steepness)


def _logistic_phi(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    # Steepness grows for close values: scaled by |d|^-lambda (ART, "activation replacement trick").
    return torch.sigmoid(d * steepness / (d.abs() + 1e-10).pow(art_lambda))


def _gaussian(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    # Normal CDF with sigma = 1 / steepness. diffsort's hand-written backward rounds sigma to float32, which
    # moves float64 gradients by ~1e-7 relative; plain autograd here gives the exact derivative instead.
    sigma = 1.0 / steepness
    return 0.5 + 0.5 * torch.erf(d / sigma / math.sqrt(2))


def _reciprocal(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    v = steepness * d
    return 0.5 * (v / (2 + v.abs()) + 1)


def _cauchy(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    v = steepness * d
    return 1 / math.pi * torch.atan(v) + 0.5


def _optimal(d: torch.Tensor, steepness: float, art_lambda: float) -> torch.Tensor:
    # Linear on [-1/4, 1/4], then 1/x tails: the relaxation with the smallest error bound (Petersen et al.).
    v = steepness * d
    tail = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
    return v.clamp(-0.25, 0.25) + 0.5 + tail * (0.25 - 1 / 16 / (v.abs() + 1e-10))


_ALPHA: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "cauchy": _cauchy,
    "logistic": _logistic,
    "logistic_phi": _logistic_phi,
    "gaussian": _gaussian,
    "reciprocal": _reciprocal,
    "optimal": _optimal,
}
assert tuple(_ALPHA) == DISTRIBUTIONS


def _wire_weights(
    layer: SortLayer, x: torch.Tensor, steepness: float, distribution: str, art_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output wire, the weights ``(own, other)`` of its own column and of its partner's column."""
    d = x.index_select(1, layer.second) - x.index_select(1, layer.first)
    alpha = _ALPHA[distribution](d, steepness, art_lambda).index_select(1, layer.comparator)
    beta = 1 - alpha
    if not layer.any_flipped:
        return alpha, beta
    return torch.where(layer.flipped, beta, alpha), torch.where(layer.flipped, alpha, beta)


class _SwapWires(torch.autograd.Function):
    """``t.index_select(1, partner)`` for an involution ``partner`` (each wire swapped with its partner).

    Autograd would back-propagate an index_select with a zero-filled index_add; since the permutation is
    its own inverse, the backward pass is the same cheap gather.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(partner)
        return t.index_select(1, partner)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (partner,) = ctx.saved_tensors
        return grad.index_select(1, partner), None


def _prepare(x: torch.Tensor, network: str, distribution: str) -> torch.Tensor:
    _check_network(network)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid options: {', '.join(DISTRIBUTIONS)}")
    if x.dim() != 2:
        raise ValueError(f"diff_sort sorts the rows of a 2-D tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point() or torch.finfo(x.dtype).bits < 32:
        # Half precision cannot resolve steep comparators; the network runs in float32 at least.
        x = x.float()
    return x


def diff_sort(
    x: torch.Tensor,
    network: str = "bitonic",
    steepness: float = 10.0,
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-sort each row of ``x`` (shape ``(rows, n)``) ascending with a differentiable sorting network.

    Returns ``(x_sorted, X)``: ``x_sorted`` of shape ``(rows, n)`` and ``X`` of shape ``(rows, n, n)`` with
    ``X[r, i, j]`` the mass of ``x[r, i]`` at rank ``j``, so ``x_sorted = x @ X`` (up to rounding). Matches
    ``diffsort.DiffSortNet(network, n, steepness=..., distribution=..., art_lambda=...)``. The result is
    float64 for float64 input and float32 otherwise; autocast is disabled inside.
    """
    x = _prepare(x, network, distribution)
    rows, n = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Xt[r, j, i] = X[r, i, j]: keeping wires on dim 1 makes each comparator gather whole contiguous
        # rows of n values instead of strided single elements.
        Xt = torch.eye(n, dtype=x.dtype, device=x.device).expand(rows, n, n)
        for layer in _network_on(network, n, x.device):
            own, other = _wire_weights(layer, x, steepness, distribution, art_lambda)
            # other[partner[w]] == other[w] (both wires share comparator and orientation), so weighting
            # before the gather gives other[w] * col[partner[w]] bit for bit, and autograd keeps only the
            # layer's input alive for the backward pass instead of a gathered copy of it.
            x = own * x + _SwapWires.apply(other * x, layer.partner)
            Xt = own.unsqueeze(-1) * Xt + _SwapWires.apply(other.unsqueeze(-1) * Xt, layer.partner)
        X = Xt.transpose(1, 2).contiguous()
    return x, X


def diff_sort_dense(
    x: torch.Tensor,
    network: str = "bitonic",
    steepness: float = 10.0,
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`diff_sort` computed with one dense ``(rows, n, n)`` mixing matrix per layer (``X <- X @ M``).

    ``O(n^3)`` per row and layer against ``O(n^2)``: the slow, obviously-correct reference path.
    """
    x = _prepare(x, network, distribution)
    rows, n = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        X = eye.expand(rows, n, n)
        for layer in _network_on(network, n, x.device):
            own, other = _wire_weights(layer, x, steepness, distribution, art_lambda)
            # M[i, w]: weight of old wire i in new wire w. An identity wire gets 0.5 + 0.5 on the diagonal.
            to_partner = eye.index_select(1, layer.partner)
            M = eye * own.unsqueeze(1) + to_partner * other.unsqueeze(1)
            X = X @ M
            x = (x.unsqueeze(1) @ M).squeeze(1)
    return x, X
