"""The differentiable sorting network of :func:`neco.loss.sorting.diff_sort` as two fused Triton kernels.

A program sorts one row (or a few short ones): it keeps the values and the permutation matrix in registers
through every layer of the network, so the forward pass writes only its results and, per row, layer and
comparator, the swap weight ``alpha = f(steepness * d)`` and the difference ``d = x[second] - x[first]`` it
came from (``d`` gives the slope of ``f`` and the values' part of the gradient). The backward pass rebuilds
the matrices it needs from the weights: one replay of the network stores a checkpoint every ``SEGMENT``
layers, and each layer's input matrix is replayed from its segment's checkpoint, so memory stays at a few
matrices per row instead of one per layer.

Wires live on power-of-two "slots" (Triton blocks are powers of two): the padded bitonic network already has
that many wires, its lowest ``pad`` being the dropped ones (diffsort's convention); odd-even leaves the slots
above ``n`` unused. Unused slots hold zeros and identity comparators, which pass them through unchanged. The
network is the sparse path's own (:func:`neco.loss.sorting.sorting_network`), so both follow diffsort 0.2.0.

Moving a value to its comparator partner is a gather along the wire axis: ``tl.gather`` by default (a warp
shuffle here, as the wire axis lies within a warp), or a round trip through a per-program scratch buffer in
global memory (``exchange="scratch"``), which needs nothing beyond loads, stores and barriers. float32 and
float64 inputs are computed in their own precision (half precision in float32). Under ``TRITON_INTERPRET=1``
(set before this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from neco.loss.sorting import _prepare, diff_sort, sorting_network

try:
    import triton
    import triton.language as tl
except ImportError:  # the sparse path needs no Triton; asking for this one says why it cannot run
    triton = None

# The interpreter is chosen when the kernels below are defined, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Distributions with a kernel, and their codes in it. gaussian and logistic_phi (erf; |d|^-lambda with its kink
# at ties) run on the sparse path instead: they are not NeCo's setting and would need more special functions.
KERNEL_DISTRIBUTIONS = {"cauchy": 0, "logistic": 1, "reciprocal": 2, "optimal": 3}
EXCHANGES = ("gather", "scratch")
DEFAULT_EXCHANGE = "gather" if triton is not None and hasattr(tl, "gather") else "scratch"
SEGMENT = 4  # layers per backward checkpoint: the replay costs ~SEGMENT/2 layers per layer, memory L/SEGMENT


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton sorter cannot run on ``device`` here, or None when it can."""
    if triton is None:
        return "triton is not installed"
    if device.type == "cuda" or INTERPRETED:  # the interpreter works on host copies of any tensor
        return None
    return f"Triton kernels need a CUDA tensor (got {device.type}; TRITON_INTERPRET=1 runs them on CPU)"


def check_available(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"loss.sorter=triton cannot run: {reason}; use loss.sorter=sparse")


if triton is not None:

    @triton.jit
    def _atan(v):
        # Cephes' atan (rational approximation after range reduction), accurate to float64 rounding; Triton has
        # no portable atan (libdevice is not available in the interpreter). Constants are made in v's dtype so
        # float64 runs are not limited by float32 literals.
        dt = v.dtype
        ax = tl.abs(v)
        big = ax > 2.414213562373095  # tan(3 pi / 8)
        mid = (ax > 0.66) & (ax <= 2.414213562373095)
        xr = tl.where(big, -1 / tl.where(big, ax, 1), tl.where(mid, (ax - 1) / (ax + 1), ax))
        base = tl.where(big, tl.full([], 1.5707963267948966, dt),
                        tl.where(mid, tl.full([], 0.7853981633974483, dt), 0))
        more = tl.where(big, tl.full([], 6.123233995736766e-17, dt),  # the low bits of pi / 2 and pi / 4
                        tl.where(mid, tl.full([], 3.061616997868383e-17, dt), 0))
        z = xr * xr
        p = tl.full([], -8.750608600031904e-1, dt) * z + tl.full([], -1.6157537187333652e1, dt)
        p = p * z + tl.full([], -7.500855792314705e1, dt)
        p = p * z + tl.full([], -1.2288666844901361e2, dt)
        p = p * z + tl.full([], -6.485021904942025e1, dt)
        q = z + tl.full([], 2.485846490142306e1, dt)
        q = q * z + tl.full([], 1.6502700983169885e2, dt)
        q = q * z + tl.full([], 4.3288106049129027e2, dt)
        q = q * z + tl.full([], 4.8539039963591370e2, dt)
        q = q * z + tl.full([], 1.9455065714826140e2, dt)
        r = base + ((xr * (z * p / q) + xr) + more)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _alpha(d, steep, DIST: tl.constexpr):
        # alpha = f(steepness * d), in the operation order of neco.loss.sorting's _ALPHA.
        v = steep * d
        if DIST == 0:  # cauchy
            a = tl.full([], 0.3183098861837907, d.dtype) * _atan(v) + 0.5
        elif DIST == 1:  # logistic
            a = 1 / (1 + tl.exp(-v))
        elif DIST == 2:  # reciprocal
            a = 0.5 * (v / (2 + tl.abs(v)) + 1)
        else:  # optimal: linear on [-1/4, 1/4], then 1/x tails
            tail = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)
            a = tl.minimum(tl.maximum(v, -0.25), 0.25) + 0.5 + tail * (0.25 - 1 / 16 / (tl.abs(v) + 1e-10))
        return a

    @triton.jit
    def _slope(d, a, steep, DIST: tl.constexpr):
        # d alpha / d d, as autograd differentiates _ALPHA (clamp passes its bounds, the tail step has none).
        v = steep * d
        if DIST == 0:
            slope = tl.full([], 0.3183098861837907, d.dtype) / (1 + v * v)
        elif DIST == 1:
            slope = a * (1 - a)
        elif DIST == 2:
            slope = 1 / ((2 + tl.abs(v)) * (2 + tl.abs(v)))
        else:
            slope = tl.where(tl.abs(v) <= 0.25, 1, 1 / 16 / ((tl.abs(v) + 1e-10) * (tl.abs(v) + 1e-10)))
        return slope * steep

    @triton.jit
    def _swap_vec(v, p, lr, u, scr, R: tl.constexpr, S: tl.constexpr, GATHER: tl.constexpr):
        # v[r, p[w]] for every row r and slot w: the value of w's comparator partner.
        if GATHER:
            out = tl.gather(v, tl.zeros([R, S], tl.int32) + p[None, :], 1)
        else:
            tl.debug_barrier()  # every thread is done reading the scratch before it is overwritten
            tl.store(scr + lr[:, None] * S + u[None, :], v)
            tl.debug_barrier()
            out = tl.load(scr + lr[:, None] * S + p[None, :])
        return out

    @triton.jit
    def _swap_mat(m, p, lr, u, scr, R: tl.constexpr, S: tl.constexpr, GATHER: tl.constexpr):
        # m[r, i, p[j]]: each wire column replaced by its partner's.
        if GATHER:
            out = tl.gather(m, tl.zeros([R, S, S], tl.int32) + p[None, None, :], 2)
        else:
            at = (lr[:, None, None] * S + u[None, :, None]) * S
            tl.debug_barrier()
            tl.store(scr + at + u[None, None, :], m)
            tl.debug_barrier()
            out = tl.load(scr + at + p[None, None, :])
        return out

    @triton.jit
    def _layer(tab_ptr, w_ptr, l, row, u, real, L, C, S: tl.constexpr):
        # Layer l as each slot sees it: partner, first wire of its comparator?, flipped?, and the saved
        # alpha turned into the weights (own, other) of its own and its partner's column.
        t = tab_ptr + l * 3 * S
        p = tl.load(t + u)
        code = tl.load(t + S + u)[None, :]
        saved = (row[:, None] * L + l) * C + tl.load(t + 2 * S + u)[None, :]
        a = tl.load(w_ptr + saved, mask=real, other=0.5)  # unused slots: identities
        flip = (code & 2) != 0
        return p, (code & 1) != 0, flip, saved, a, tl.where(flip, 1 - a, a), tl.where(flip, a, 1 - a)

    @triton.jit
    def _replay(m, tab_ptr, w_ptr, start, stop, row, lr, u, real, scr, L, C,
                R: tl.constexpr, S: tl.constexpr, GATHER: tl.constexpr):
        # Apply layers [start, stop) to the matrices m (rows x inputs x wires), as the forward pass did.
        for k in range(start, stop):
            p, lo, flip, saved, a, own, other = _layer(tab_ptr, w_ptr, k, row, u, real, L, C, S)
            m = own[:, None, :] * m + other[:, None, :] * _swap_mat(m, p, lr, u, scr, R, S, GATHER)
        return m

    @triton.jit
    def _rows(rows, n, OFF, R: tl.constexpr, S: tl.constexpr):
        # This program's rows, its slots, which (row, slot) hold a real wire, and the same for (row, i, j).
        lr = tl.arange(0, R)
        row = tl.program_id(0).to(tl.int64) * R + lr
        u = tl.arange(0, S)
        real = (u[None, :] >= OFF) & (u[None, :] < OFF + n) & (row < rows)[:, None]
        real3 = real[:, :, None] & real[:, None, :]
        at = row[:, None, None] * n * n + (u[None, :, None] - OFF) * n + u[None, None, :] - OFF
        return lr, row, u, real, real3, at

    @triton.jit
    def _sort_fwd(x_ptr, steep_ptr, tab_ptr, w_ptr, d_ptr, xs_ptr, X_ptr, scr_ptr, rows, n, L, C, OFF,
                  R: tl.constexpr, S: tl.constexpr, DIST: tl.constexpr, GATHER: tl.constexpr):
        lr, row, u, real, real3, at = _rows(rows, n, OFF, R, S)
        x = tl.load(x_ptr + row[:, None] * n + u[None, :] - OFF, mask=real, other=0.0)
        steep = tl.load(steep_ptr)
        scr = scr_ptr + tl.program_id(0).to(tl.int64) * R * S * S
        # m[r, i, j]: mass of input i on wire j.
        m = tl.where((u[None, :, None] == u[None, None, :]) & real3, 1, 0).to(x.dtype)
        for l in range(L):
            t = tab_ptr + l * 3 * S
            p = tl.load(t + u)
            code = tl.load(t + S + u)[None, :]
            lo = (code & 1) != 0
            flip = (code & 2) != 0
            xp = _swap_vec(x, p, lr, u, scr, R, S, GATHER)
            # Both wires of a comparator compute the same d = x[second] - x[first], bit for bit.
            d = tl.where(lo, xp - x, x - xp)
            a = _alpha(d, steep, DIST)
            saved = (row[:, None] * L + l) * C + tl.load(t + 2 * S + u)[None, :]
            tl.store(w_ptr + saved, a, mask=lo & real)
            tl.store(d_ptr + saved, d, mask=lo & real)
            own = tl.where(flip, 1 - a, a)
            other = tl.where(flip, a, 1 - a)
            x = own * x + other * xp
            m = own[:, None, :] * m + other[:, None, :] * _swap_mat(m, p, lr, u, scr, R, S, GATHER)
        tl.store(xs_ptr + row[:, None] * n + u[None, :] - OFF, x, mask=real)
        tl.store(X_ptr + at, m, mask=real3)

    @triton.jit
    def _sort_bwd(gxs_ptr, gX_ptr, steep_ptr, tab_ptr, w_ptr, d_ptr, ck_ptr, scr_ptr, gx_ptr, rows, n, L, C, OFF,
                  K, NCK, R: tl.constexpr, S: tl.constexpr, DIST: tl.constexpr, GATHER: tl.constexpr,
                  HAS_GXS: tl.constexpr, HAS_GX: tl.constexpr):
        lr, row, u, real, real3, at = _rows(rows, n, OFF, R, S)
        steep = tl.load(steep_ptr)
        scr = scr_ptr + tl.program_id(0).to(tl.int64) * R * S * S
        diagonal = (u[None, :, None] == u[None, None, :]) & real3  # a mask, not a matrix kept in registers
        ck = ck_ptr + at + row[:, None, None] * (NCK - 1) * n * n  # row r's checkpoints: NCK matrices from here
        if HAS_GXS:
            gy = tl.load(gxs_ptr + row[:, None] * n + u[None, :] - OFF, mask=real, other=0.0)
        else:
            gy = tl.zeros([R, S], steep.dtype)
        if HAS_GX:
            # Checkpoints: the matrices entering layers K, 2K, ..., NCK*K (the identity enters layer 0).
            m = tl.where(diagonal, 1, 0).to(steep.dtype)
            for k in range(NCK):
                m = _replay(m, tab_ptr, w_ptr, k * K, k * K + K, row, lr, u, real, scr, L, C, R, S, GATHER)
                tl.store(ck + k * n * n, m, mask=real3)
            gm = tl.load(gX_ptr + at, mask=real3, other=0.0)
        for j in range(L):
            l = L - 1 - j
            p, lo, flip, saved, a, own, other = _layer(tab_ptr, w_ptr, l, row, u, real, L, C, S)
            d = tl.load(d_ptr + saved, mask=real, other=0.0)
            # Per slot w: d(outputs of w)/d(own weight) summed against their gradients; own = alpha unless
            # flipped. The values' part uses x[w] - x[partner] = -d on the first wire, +d on the second.
            gyp = _swap_vec(gy, p, lr, u, scr, R, S, GATHER)
            t = gy * tl.where(lo, -d, d)
            if HAS_GX:
                s = l // K
                z = tl.load(ck + tl.maximum(s - 1, 0) * n * n, mask=real3 & (s > 0), other=0.0)
                z = tl.where(diagonal & (s == 0), 1, z)
                z = _replay(z, tab_ptr, w_ptr, s * K, l, row, lr, u, real, scr, L, C, R, S, GATHER)
                gmp = _swap_mat(gm, p, lr, u, scr, R, S, GATHER)
                # sum_i g[i, w] (z[i, w] - z[i, p(w)]), its second half summed over the pair as
                # sum_i g[i, p(w)] z[i, w]: the comparator total is the same and no gather of z is needed.
                t += tl.sum((gm - gmp) * z, axis=1)
                gm = own[:, None, :] * gm + other[:, None, :] * gmp
            t = tl.where(flip, -t, t)
            # The comparator's two wires share alpha: its gradient is the sum over both.
            g_d = (t + _swap_vec(t, p, lr, u, scr, R, S, GATHER)) * _slope(d, a, steep, DIST)
            gy = own * gy + other * gyp + tl.where(lo, -g_d, g_d)
        tl.store(gx_ptr + row[:, None] * n + u[None, :] - OFF, gy, mask=real)


@dataclass(frozen=True)
class _Plan:
    """A network laid out on ``slots`` power-of-two wires for the kernels."""

    table: torch.Tensor  # (layers, 3, slots) int32: partner slot, 1 = first wire | 2 = flipped, comparator
    layers: int
    comparators: int  # most comparators in a layer, identities included
    slots: int
    offset: int  # slot of wire 0


@lru_cache(maxsize=64)
def _plan(network: str, n: int, device: torch.device) -> _Plan:
    layers = sorting_network(network, n)
    slots = max(2, 1 << (n - 1).bit_length())
    offset = slots - n if network == "bitonic" else 0  # bitonic: the dropped wires are the lowest
    table = torch.zeros(max(len(layers), 1), 3, slots, dtype=torch.int32)
    table[:, 0] = torch.arange(slots, dtype=torch.int32)
    table[:, 1] = 1  # unused slots: identity comparators (first == second)
    for index, layer in enumerate(layers):
        wires = torch.arange(n)
        comparator = layer.comparator
        table[index, 0, offset:offset + n] = (layer.partner + offset).int()
        first = layer.first[comparator] == wires
        table[index, 1, offset:offset + n] = first.int() + 2 * layer.flipped.int()
        table[index, 2, offset:offset + n] = comparator.int()
    comparators = max((len(layer.first) for layer in layers), default=1)
    return _Plan(table.to(device), len(layers), comparators, slots, offset)


@lru_cache(maxsize=64)
def _steepness(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A device tensor in the compute dtype (a Python float would reach the kernel as float32), made once: a
    # host-to-device copy per call would cost a copy and a possible sync per sort.
    return torch.tensor([value], dtype=dtype, device=device)


def _launch(slots: int, rows: int, backward: bool) -> tuple[int, int, int]:
    """(rows per program, programs, warps). About 4096 matrix entries a program on a GPU: one row of 64 slots,
    several small rows. The interpreter pays per operation, not per entry, so it takes up to 64 rows at once.

    Warps: 8 (forward) and 16 (backward) for 4096 entries. The backward holds three matrices and a gather
    index at once; at fewer warps each thread needs ~160-255 registers, which leaves one or two programs, 8
    warps, per SM, against 16 warps at ~100 registers (ptxas, sm_90, float32)."""
    per = min(64, triton.next_power_of_2(rows)) if INTERPRETED else max(1, min(32, 4096 // slots**2))
    warps = max(1, min(16 if backward else 8, per * slots**2 // (256 if backward else 512)))
    return per, triton.cdiv(rows, per), warps


class _TritonSort(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, network, steepness, distribution, exchange):
        rows, n = x.shape
        plan = _plan(network, n, x.device)
        per, programs, warps = _launch(plan.slots, rows, backward=False)
        x = x.contiguous()
        steep = _steepness(steepness, x.dtype, x.device)
        alphas, diffs = x.new_empty(2, rows, max(plan.layers, 1), plan.comparators)
        values, X = torch.empty_like(x), torch.empty(rows, n, n, dtype=x.dtype, device=x.device)
        gather = exchange == "gather"
        scratch = x.new_empty(1 if gather else programs * per * plan.slots**2)
        _sort_fwd[(programs,)](x, steep, plan.table, alphas, diffs, values, X, scratch, rows, n, plan.layers,
                               plan.comparators, plan.offset, R=per, S=plan.slots,
                               DIST=KERNEL_DISTRIBUTIONS[distribution], GATHER=gather, num_warps=warps)
        ctx.save_for_backward(alphas, diffs, steep)
        ctx.setup = (plan, distribution, gather, n)
        ctx.set_materialize_grads(False)
        return values, X

    @staticmethod
    def backward(ctx, g_values, g_X):
        if g_values is None and g_X is None:
            return None, None, None, None, None
        alphas, diffs, steep = ctx.saved_tensors
        plan, distribution, gather, n = ctx.setup
        rows = diffs.shape[0]
        per, programs, warps = _launch(plan.slots, rows, backward=True)
        checkpoints = (plan.layers - 1) // SEGMENT if g_X is not None and plan.layers else 0
        ck = diffs.new_empty(max(rows * checkpoints * n * n, 1))
        scratch = diffs.new_empty(1 if gather else programs * per * plan.slots**2)
        gx = diffs.new_empty(rows, n)
        # A missing gradient is never read: any tensor of the right dtype stands in for its pointer.
        gxs = diffs if g_values is None else g_values.to(diffs.dtype).contiguous()
        gX = diffs if g_X is None else g_X.to(diffs.dtype).contiguous()
        _sort_bwd[(programs,)](gxs, gX, steep, plan.table, alphas, diffs, ck, scratch, gx, rows, n, plan.layers,
                               plan.comparators, plan.offset, SEGMENT, checkpoints, R=per, S=plan.slots,
                               DIST=KERNEL_DISTRIBUTIONS[distribution], GATHER=gather,
                               HAS_GXS=g_values is not None, HAS_GX=g_X is not None, num_warps=warps)
        return gx, None, None, None, None


def triton_diff_sort(
    x: torch.Tensor,
    network: str = "bitonic",
    steepness: float = 10.0,
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
    exchange: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`neco.loss.sorting.diff_sort` (same arguments, results and diffsort 0.2.0 semantics) in Triton.

    ``exchange``: ``"gather"`` (``tl.gather``) or ``"scratch"`` (global-memory round trip), how a comparator
    reads its partner wire; default ``"gather"`` where this Triton has it. Raises ``ValueError`` where the
    kernels cannot run (no Triton; a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    check_available(x.device)
    x = _prepare(x, network, distribution)
    exchange = exchange or DEFAULT_EXCHANGE
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange {exchange!r}; valid options: {', '.join(EXCHANGES)}")
    if distribution not in KERNEL_DISTRIBUTIONS or x.shape[0] == 0:
        return diff_sort(x, network, steepness, distribution, art_lambda)  # see KERNEL_DISTRIBUTIONS
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _TritonSort.apply(x, network, float(steepness), distribution, exchange)
