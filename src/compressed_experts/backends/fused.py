"""``fused``: Triton kernels for every call size, forward and backward, in a handful of launches.

On a GPU the grouped path is bound by kernel launches, not by the expert weights it reads: a
compressed-experts call runs some sixty small ATen operations (sort, split, averaging, scaled
copies of the input, gathers, three grouped products, combine) where full top-k runs about
thirty, so the experts it saves are lost to the launches (BENCHMARKS.md, GPU section). Here:

1. ``_route_kernel`` (one program per token) splits the routing into main and auxiliary experts
   by rank of weight (as :func:`compressed_experts.routing.split_routing`: ties in slot order;
   fixed ``n_ce``, ``top_p`` or ``skip_below``) and averages the auxiliary experts' ``ia3``
   vectors into the token's three scales.
2. ``_align_kernel`` (one program) sorts the (token, main expert) pairs by expert into tiles of
   ``BLOCK_M`` rows, each tile one expert's, padded (as vLLM's fused MoE and ScatterMoE do); no
   host sync: the buffers are sized for the most padding there can be.
3. ``_gate_up_kernel`` scales each row's input by its token's gate and up scales as it loads it
   (no scaled copies in memory), computes the gate and up tiles in one program and applies SiLU,
   the product and the ``ce_down`` scale in its epilogue.
4. ``_down_kernel`` multiplies by the down projection and applies the routing weight in its
   epilogue, writing each pair's row; the token's rows are summed by one reduction. Not an
   atomic accumulation into the token's output: a fixed order keeps training reproducible bit for
   bit, as the grouped path is.

Backward (:class:`_Experts`): ``_down_grad_kernel`` gives the inner activations' gradient and, in
its epilogue, the routing weights', the down scale's and the pre-activations' gradients;
``_gate_up_grad_kernel`` the input's and the gate and up scales' (a per-pair reduction summed per
token); ``_weight_grad_kernel`` every expert weight's gradient, one program per expert tile over
that expert's rows. The routing step's backward recomputes it in PyTorch (a ``[T, k]`` sort and a
``[T, E]`` product: small next to the experts) and differentiates that.

Tile sizes: ``BLOCK_M`` (rows per tile, which the alignment pads to) follows the rows per expert;
the other tile sizes, warps and stages are autotuned per layer shape, dtype and ``BLOCK_M`` on
the first call, and Triton keeps the choice on disk (its cache folder), so a machine pays once.
Accumulation is in float32 whatever the dtype; float32 products use TF32 only where PyTorch's own
matmuls are allowed to (``torch.backends.cuda.matmul.allow_tf32``).

Forms: ``none`` (top-m), ``ia3`` and full top-k (``n_ce = 0``), under a fixed ``n_ce`` or a
per-token rule; ``slim`` too, its small experts a second pass of the same kernels (the split made
in PyTorch). On a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
slow: how the tests check the kernels on a machine with no GPU).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from types import SimpleNamespace

import torch

from ..routing import Call, split_routing
from .base import Backend
from .decode import kernel_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the layer never asks for this path there
    _HAS_TRITON = False
else:
    _HAS_TRITON = True

#: Rules the routing kernel knows, by the constant it takes.
_FIXED, _TOP_P, _SKIP_BELOW = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _autotuned(names: tuple[str, ...], key: list[str]):
    """Triton's autotuner over :func:`_configs`, keyed by ``key`` (and the arguments' dtypes), its
    choice kept on disk where this Triton can (``cache_results``, not in every Triton that a
    supported PyTorch brings: an older one must still import the package)."""
    cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=_configs(names), key=key, **cache)


def _configs(names: tuple[str, ...]):
    """Autotuning candidates for a product kernel; under the interpreter one, small enough to cover
    partial and several blocks in the tests' small shapes, large enough to keep them quick."""
    if _interpreting():
        return [triton.Config(dict.fromkeys(names, 32))]
    sizes = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (32, 64, 4, 4), (64, 128, 8, 3)]
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in sizes]


if _HAS_TRITON:

    @triton.jit
    def _route_kernel(
        index,
        weights,
        ce_gate,
        ce_up,
        ce_down,
        main_index,
        main_weights,
        scale_gate,
        scale_up,
        scale_down,
        threshold,
        slots: tl.constexpr,
        main: tl.constexpr,
        num_experts: tl.constexpr,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        RULE: tl.constexpr,
        HAS_CE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One token: its main experts (``main`` of them, heaviest first; under a per-token rule all
        ``slots``, those not main given the id ``num_experts``) and its averaged auxiliary vectors."""
        token = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        real = s < slots
        w = tl.load(weights + token * slots + s, mask=real, other=float("-inf")).to(tl.float32)
        experts = tl.load(index + token * slots + s, mask=real, other=0).to(tl.int64)
        ahead = (w[None, :] > w[:, None]) | ((w[None, :] == w[:, None]) & (s[None, :] < s[:, None]))
        ahead = ahead & real[None, :]
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        if RULE == 0:
            is_main = rank < main
        elif RULE == 1:  # top_p: the slots before it hold less than top_p of the routed weight
            held = tl.where(real, w, 0.0)
            before = tl.sum(tl.where(ahead, held[None, :], 0.0), axis=1)
            is_main = (before < threshold * tl.sum(held)) | (rank == 0)
        else:  # skip_below: at least that fraction of the token's top weight
            is_main = (w >= threshold * tl.max(w)) | (rank == 0)
        is_main = is_main & real
        out = token * main + rank
        tl.store(main_index + out, tl.where(is_main, experts, num_experts), mask=real & (rank < main))
        tl.store(main_weights + out, w.to(main_weights.dtype.element_ty), mask=real & (rank < main))
        if HAS_CE:
            aux = real & ~is_main
            share = tl.where(aux, w + 1e-30, 0.0)  # renormalised auxiliary weights, as the ia3 form does
            total = tl.sum(share)
            alone = total == 0  # no auxiliary expert (a per-token rule kept them all): scales of 1
            share = share / tl.where(alone, 1.0, total)
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                vec = experts[:, None] * hidden + k[None, :]
                both = aux[:, None] & (k[None, :] < hidden)
                g = tl.sum(share[:, None] * tl.load(ce_gate + vec, mask=both, other=0.0).to(tl.float32), 0)
                u = tl.sum(share[:, None] * tl.load(ce_up + vec, mask=both, other=0.0).to(tl.float32), 0)
                tl.store(scale_gate + token * hidden + k, tl.where(alone, 1.0, g), mask=k < hidden)
                tl.store(scale_up + token * hidden + k, tl.where(alone, 1.0, u), mask=k < hidden)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                vec = experts[:, None] * inter + k[None, :]
                both = aux[:, None] & (k[None, :] < inter)
                d = tl.sum(share[:, None] * tl.load(ce_down + vec, mask=both, other=0.0).to(tl.float32), 0)
                tl.store(scale_down + token * inter + k, tl.where(alone, 1.0, d), mask=k < inter)

    @triton.jit
    def _align_kernel(
        ids,
        pairs,
        counts,
        starts,
        seen,
        sorted_pair,
        tile_expert,
        tiles,
        capacity,
        num_experts: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One program: every expert's rows (a histogram of the ids; the id ``num_experts`` counts for
        none), each expert's block padded to ``BLOCK_M`` and placed after the previous one, every tile's
        expert, and every pair's row: its expert's start plus the pairs of that expert before it (in
        pair order, so equal ids keep token order). ``seen`` is scratch for each expert's next free row."""
        e = tl.arange(0, BLOCK_E)
        real = e < num_experts
        hist = tl.zeros([BLOCK_E], dtype=tl.int32)
        for p0 in range(0, pairs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            hist += tl.histogram(tl.load(ids + p, mask=p < pairs, other=num_experts).to(tl.int32), BLOCK_E)
        hist = tl.where(real, hist, 0)
        padded = (hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        tl.store(counts + e, hist, mask=real)
        tl.store(starts + e, ends - padded, mask=real)
        for t0 in range(0, tiles, BLOCK_P):
            t = t0 + tl.arange(0, BLOCK_P)
            before = (ends[None, :] <= (t * BLOCK_M)[:, None]) & real[None, :]  # experts ending by the tile's start
            tl.store(tile_expert + t, tl.sum(before.to(tl.int32), axis=1), mask=t < tiles)
        for c0 in range(0, capacity, BLOCK_P):
            c = c0 + tl.arange(0, BLOCK_P)
            tl.store(sorted_pair + c, tl.zeros([BLOCK_P], dtype=tl.int32) + pairs, mask=c < capacity)  # padding
        # Each expert's next free row is kept in registers and published to ``seen`` for the gather: every
        # thread holding a copy writes the same value, and barriers keep the reads between the writes
        # (no read-modify-write of memory that threads share).
        running = ends - padded
        for p0 in range(0, pairs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            ids_p = tl.load(ids + p, mask=p < pairs, other=num_experts).to(tl.int32)
            valid = ids_p < num_experts
            tl.store(seen + e, running, mask=real)
            tl.debug_barrier()  # also orders the padding above before the rows below
            earlier = (ids_p[None, :] == ids_p[:, None]) & (p[None, :] < p[:, None]) & valid[None, :]
            row = tl.load(seen + ids_p, mask=valid, other=0) + tl.sum(earlier.to(tl.int32), axis=1)
            tl.store(sorted_pair + row, p, mask=valid)
            running += tl.histogram(tl.where(valid, ids_p, num_experts), BLOCK_E)
            tl.debug_barrier()

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b``. ``UPCAST`` (the interpreter only): its ``tl.dot`` reads bfloat16 operands as
        raw bits, so they go in as float32, which holds them exactly; a GPU multiplies them as they are."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _tile_rows(sorted_pair, tile_expert, pairs, main: tl.constexpr, num_experts, BLOCK_M: tl.constexpr):
        """The expert of this program's tile (``num_experts``: a tile past the last, nothing to do),
        its rows' positions in the sorted layout, their (token, slot) pairs, tokens and validity."""
        tile = tl.program_id(0)
        expert = tl.load(tile_expert + tile).to(tl.int64)
        pos = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        pair = tl.load(sorted_pair + pos).to(tl.int64)
        valid = pair < pairs
        return expert, pos, pair, pair // main, valid

    @_autotuned(("BLOCK_N", "BLOCK_K"), ["hidden", "inter", "BLOCK_M", "HAS_CE", "SAVE"])
    @triton.jit
    def _gate_up_kernel(
        x,
        scale_gate,
        scale_up,
        scale_down,
        gate_up,
        sorted_pair,
        tile_expert,
        inner,
        pre_gate,
        pre_up,
        pairs,
        main: tl.constexpr,
        num_experts,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        HAS_CE: tl.constexpr,
        SAVE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``inner[row] = silu(x_t*g_t @ Wg_e.T) * (x_t*u_t @ Wu_e.T) * d_t`` for a tile of rows and
        ``BLOCK_N`` intermediate neurons; with ``SAVE`` the two pre-activations too (for backward)."""
        expert, pos, pair, token, valid = _tile_rows(sorted_pair, tile_expert, pairs, main, num_experts, BLOCK_M)
        if expert < num_experts:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < inter
            w_gate = gate_up + expert * 2 * inter * hidden
            w_up = w_gate + inter * hidden
            acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                rows_k = valid[:, None] & (k[None, :] < hidden)
                at = token[:, None] * hidden + k[None, :]
                xk = tl.load(x + at, mask=rows_k, other=0.0)
                if HAS_CE:  # the token's scales applied as it is loaded
                    a_gate = (xk.to(tl.float32) * tl.load(scale_gate + at, mask=rows_k, other=0.0)).to(xk.dtype)
                    a_up = (xk.to(tl.float32) * tl.load(scale_up + at, mask=rows_k, other=0.0)).to(xk.dtype)
                else:
                    a_gate = xk
                    a_up = xk
                tile = n[None, :] * hidden + k[:, None]
                ok = (k[:, None] < hidden) & n_ok[None, :]
                acc_gate = _dot(a_gate, tl.load(w_gate + tile, mask=ok, other=0.0), acc_gate, PRECISION, UPCAST)
                acc_up = _dot(a_up, tl.load(w_up + tile, mask=ok, other=0.0), acc_up, PRECISION, UPCAST)
            h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
            rows_n = valid[:, None] & n_ok[None, :]
            if HAS_CE:
                h = h * tl.load(scale_down + token[:, None] * inter + n[None, :], mask=rows_n, other=0.0)
            at = pos[:, None] * inter + n[None, :]
            tl.store(inner + at, h.to(inner.dtype.element_ty), mask=rows_n)
            if SAVE:
                tl.store(pre_gate + at, acc_gate.to(pre_gate.dtype.element_ty), mask=rows_n)
                tl.store(pre_up + at, acc_up.to(pre_up.dtype.element_ty), mask=rows_n)

    @_autotuned(("BLOCK_N", "BLOCK_K"), ["hidden", "inter", "BLOCK_M"])
    @triton.jit
    def _down_kernel(
        inner,
        down,
        main_weights,
        sorted_pair,
        tile_expert,
        pair_out,
        pairs,
        main: tl.constexpr,
        num_experts,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``pair_out[pair] = w_pair * inner[row] @ D_e.T`` for a tile of rows and ``BLOCK_N`` outputs."""
        expert, pos, pair, token, valid = _tile_rows(sorted_pair, tile_expert, pairs, main, num_experts, BLOCK_M)
        if expert < num_experts:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < hidden
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(inner + pos[:, None] * inter + k[None, :], mask=valid[:, None] & (k[None, :] < inter))
                tile = expert * hidden * inter + n[None, :] * inter + k[:, None]
                d = tl.load(down + tile, mask=(k[:, None] < inter) & n_ok[None, :], other=0.0)
                acc = _dot(h, d, acc, PRECISION, UPCAST)
            weight = tl.load(main_weights + pair, mask=valid, other=0.0).to(tl.float32)
            at = pair[:, None] * hidden + n[None, :]
            tl.store(
                pair_out + at,
                (acc * weight[:, None]).to(pair_out.dtype.element_ty),
                mask=valid[:, None] & n_ok[None, :],
            )

    @_autotuned(("BLOCK_N", "BLOCK_K"), ["hidden", "inter", "BLOCK_M", "HAS_CE"])
    @triton.jit
    def _down_grad_kernel(
        grad_out,
        down,
        main_weights,
        inner,
        pre_gate,
        pre_up,
        scale_down,
        sorted_pair,
        tile_expert,
        grad_gate,
        grad_up,
        grad_scale_down,
        grad_weight,
        pairs,
        main: tl.constexpr,
        num_experts,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        HAS_CE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """For a tile of rows and ``BLOCK_N`` neurons: ``dh = grad_out_t @ D_e`` and from it the
        gradients of the two pre-activations (sorted rows), of the down scale (per pair) and the
        neurons' part of the routing weight's (``dh . inner``, per pair and block of neurons)."""
        expert, pos, pair, token, valid = _tile_rows(sorted_pair, tile_expert, pairs, main, num_experts, BLOCK_M)
        if expert < num_experts:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < inter
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                g = tl.load(
                    grad_out + token[:, None] * hidden + k[None, :], mask=valid[:, None] & (k[None, :] < hidden)
                )
                tile = expert * hidden * inter + k[:, None] * inter + n[None, :]
                d = tl.load(down + tile, mask=(k[:, None] < hidden) & n_ok[None, :], other=0.0)
                acc = _dot(g.to(d.dtype), d, acc, PRECISION, UPCAST)
            rows_n = valid[:, None] & n_ok[None, :]
            at = pos[:, None] * inter + n[None, :]
            h = tl.load(inner + at, mask=rows_n, other=0.0).to(tl.float32)
            # d loss / d w_pair = dh . inner, summed here per 16 neurons: a fixed layout whatever the
            # tile size, each column written by one program, summed in a fixed order afterwards.
            part = tl.sum(tl.reshape(acc * h, [BLOCK_M, BLOCK_N // 16, 16]), axis=2)
            column = tl.program_id(1) * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
            chunks = tl.cdiv(inter, 16)
            at_part = pair[:, None] * chunks + column[None, :]
            tl.store(grad_weight + at_part, part, mask=valid[:, None] & (column[None, :] < chunks))
            weight = tl.load(main_weights + pair, mask=valid, other=0.0).to(tl.float32)
            dh = acc * weight[:, None]
            a = tl.load(pre_gate + at, mask=rows_n, other=0.0).to(tl.float32)
            b = tl.load(pre_up + at, mask=rows_n, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-a))
            act = a * sig
            if HAS_CE:
                scale = tl.load(scale_down + token[:, None] * inter + n[None, :], mask=rows_n, other=0.0)
                tl.store(grad_scale_down + pair[:, None] * inter + n[None, :], dh * act * b, mask=rows_n)
                dh = dh * scale
            tl.store(
                grad_gate + at, (dh * b * sig * (1.0 + a * (1.0 - sig))).to(grad_gate.dtype.element_ty), mask=rows_n
            )
            tl.store(grad_up + at, (dh * act).to(grad_up.dtype.element_ty), mask=rows_n)

    @_autotuned(("BLOCK_N", "BLOCK_K"), ["hidden", "inter", "BLOCK_M", "HAS_CE"])
    @triton.jit
    def _gate_up_grad_kernel(
        grad_gate,
        grad_up,
        gate_up,
        x,
        scale_gate,
        scale_up,
        sorted_pair,
        tile_expert,
        grad_x,
        grad_scale_gate,
        grad_scale_up,
        pairs,
        main: tl.constexpr,
        num_experts,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        HAS_CE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """For a tile of rows and ``BLOCK_N`` input features: ``dxg = grad_gate @ Wg_e``, ``dxu =
        grad_up @ Wu_e``, and per pair the input's gradient ``dxg*g + dxu*u`` and the scales'
        ``dxg*x`` and ``dxu*x`` (summed over the token's pairs afterwards)."""
        expert, pos, pair, token, valid = _tile_rows(sorted_pair, tile_expert, pairs, main, num_experts, BLOCK_M)
        if expert < num_experts:
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < hidden
            w_gate = gate_up + expert * 2 * inter * hidden
            w_up = w_gate + inter * hidden
            acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                rows_k = valid[:, None] & (k[None, :] < inter)
                at = pos[:, None] * inter + k[None, :]
                tile = k[:, None] * hidden + n[None, :]
                ok = (k[:, None] < inter) & n_ok[None, :]
                acc_gate = _dot(
                    tl.load(grad_gate + at, mask=rows_k, other=0.0),
                    tl.load(w_gate + tile, mask=ok, other=0.0),
                    acc_gate,
                    PRECISION,
                    UPCAST,
                )
                acc_up = _dot(
                    tl.load(grad_up + at, mask=rows_k, other=0.0),
                    tl.load(w_up + tile, mask=ok, other=0.0),
                    acc_up,
                    PRECISION,
                    UPCAST,
                )
            rows_n = valid[:, None] & n_ok[None, :]
            at = pair[:, None] * hidden + n[None, :]
            if HAS_CE:
                per_token = token[:, None] * hidden + n[None, :]
                g = tl.load(scale_gate + per_token, mask=rows_n, other=0.0)
                u = tl.load(scale_up + per_token, mask=rows_n, other=0.0)
                xv = tl.load(x + per_token, mask=rows_n, other=0.0).to(tl.float32)
                tl.store(grad_x + at, acc_gate * g + acc_up * u, mask=rows_n)
                tl.store(grad_scale_gate + at, acc_gate * xv, mask=rows_n)
                tl.store(grad_scale_up + at, acc_up * xv, mask=rows_n)
            else:
                tl.store(grad_x + at, acc_gate + acc_up, mask=rows_n)

    @_autotuned(("BLOCK_R", "BLOCK_C"), ["R", "C", "BLOCK_M", "A_SORTED", "B_SCALED"])
    @triton.jit
    def _weight_grad_kernel(
        a,
        b,
        a_weight,
        b_scale,
        sorted_pair,
        starts,
        counts,
        out,
        out_expert_stride,
        pairs,
        main: tl.constexpr,
        R: tl.constexpr,
        C: tl.constexpr,
        A_SORTED: tl.constexpr,
        B_SCALED: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``out[e] = A_e.T @ B_e`` over expert ``e``'s rows, an ``[R, C]`` tile each program.

        ``A`` is a sorted-row buffer ``[rows, R]`` or (not ``A_SORTED``) a per-token ``[T, R]``
        gathered by token and multiplied by the pair's ``a_weight``; ``B`` is per token ``[T, C]``,
        gathered, times a per-token ``b_scale`` with ``B_SCALED``, or (``A_SORTED`` off) a sorted
        buffer. An expert with no rows gets zeros."""
        expert = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        start = tl.load(starts + expert)
        end = start + tl.load(counts + expert)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M).to(tl.int64)
            pair = tl.load(sorted_pair + pos, mask=pos < end, other=pairs).to(tl.int64)
            valid = pair < pairs
            token = pair // main
            if A_SORTED:
                at = tl.load(a + pos[:, None] * R + r[None, :], mask=valid[:, None] & (r[None, :] < R), other=0.0)
                bt = tl.load(b + token[:, None] * C + c[None, :], mask=valid[:, None] & (c[None, :] < C), other=0.0)
                if B_SCALED:
                    s = tl.load(b_scale + token[:, None] * C + c[None, :], mask=valid[:, None] & (c[None, :] < C))
                    bt = (bt.to(tl.float32) * s).to(at.dtype)
            else:
                at = tl.load(a + token[:, None] * R + r[None, :], mask=valid[:, None] & (r[None, :] < R), other=0.0)
                w = tl.load(a_weight + pair, mask=valid, other=0.0).to(tl.float32)
                bt = tl.load(b + pos[:, None] * C + c[None, :], mask=valid[:, None] & (c[None, :] < C), other=0.0)
                at = (at.to(tl.float32) * w[:, None]).to(bt.dtype)
            acc = _dot(tl.trans(at), bt.to(at.dtype), acc, PRECISION, UPCAST)
        ok = (r[:, None] < R) & (c[None, :] < C)
        tl.store(out + expert * out_expert_stride + r[:, None] * C + c[None, :], acc.to(out.dtype.element_ty), mask=ok)


def available() -> bool:
    """Whether Triton is installed (the path itself also needs a CUDA device, or the interpreter)."""
    return _HAS_TRITON


def _block_m(pairs: int, num_experts: int) -> int:
    """Rows per tile: about the rows an expert gets, so that padding stays small (at least 16, the
    smallest ``tl.dot``; at most 128)."""
    if _interpreting():
        return 16
    per_expert = pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 256 else 128


class _Aligned:
    """The (token, slot) pairs sorted by expert into tiles of ``block_m`` rows, one expert per tile.

    ``sorted_pair[pos]`` is the flat pair at sorted position ``pos`` (``pairs``: padding);
    ``tile_expert[t]`` the expert of tile ``t`` (``num_experts``: past the last tile in use);
    ``starts``/``counts`` each expert's first position and number of rows. The capacity is the
    most the padding can need, ``pairs + E (block_m - 1)``, so nothing waits on a count from the
    device. Pairs with the id ``num_experts`` (not main under a per-token rule) get no row.
    """

    def __init__(self, main_index: torch.Tensor, num_experts: int, block_m: int):
        flat = main_index.reshape(-1)
        pairs, device = flat.numel(), flat.device
        self.pairs, self.block_m, self.num_experts = pairs, block_m, num_experts
        self.capacity = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
        tiles = self.capacity // block_m
        self.counts, self.starts, seen = (torch.empty(num_experts, dtype=torch.int32, device=device) for _ in range(3))
        self.sorted_pair = torch.empty(self.capacity, dtype=torch.int32, device=device)
        self.tile_expert = torch.empty(tiles, dtype=torch.int32, device=device)
        with _on(device):
            _align_kernel[(1,)](
                flat.contiguous(), pairs, self.counts, self.starts, seen, self.sorted_pair, self.tile_expert,
                tiles, self.capacity, num_experts,
                BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts + 1), BLOCK_P=128,
            )  # fmt: skip


def _precision(dtype: torch.dtype) -> str:
    """TF32 for float32 products only where PyTorch's matmuls may use it, as the other paths do."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _on(device: torch.device):
    """Triton launches on the current device, which need not be the tensors' (models split over GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def route(
    index: torch.Tensor,
    weights: torch.Tensor,
    rule: tuple[int | None, float | None, float | None],
    num_experts: int,
    vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The routing kernel: main expert ids ``[T, m]`` (heaviest first; under a per-token rule
    ``m = k`` and pairs not main carry the id ``num_experts``), their weights as the router gave
    them, and with ``vectors`` the per-token float32 scales ``(g [T, H], u [T, H], d [T, I])``."""
    n_ce, top_p, skip_below = rule
    tokens, slots = index.shape
    dynamic = top_p is not None or skip_below is not None
    main = slots if dynamic else slots - n_ce
    device = index.device
    main_index = torch.empty(tokens, main, dtype=torch.int64, device=device)
    main_weights = torch.empty(tokens, main, dtype=weights.dtype, device=device)
    if vectors is not None:
        hidden, inter = vectors[0].shape[1], vectors[2].shape[1]
        scales = tuple(torch.empty(tokens, n, dtype=torch.float32, device=device) for n in (hidden, hidden, inter))
        vectors = tuple(v.contiguous() for v in vectors)
    else:
        hidden = inter = 1
        scales = None
    stand_in = main_weights  # pointers the kernel never reads or writes without vectors
    with _on(device):
        _route_kernel[(tokens,)](
            index.contiguous(),
            weights.contiguous(),
            *(vectors or (stand_in,) * 3),
            main_index,
            main_weights,
            *(scales or (stand_in,) * 3),
            float(top_p if top_p is not None else skip_below if skip_below is not None else 0.0),
            slots,
            main,
            num_experts,
            hidden,
            inter,
            RULE=_TOP_P if top_p is not None else _SKIP_BELOW if skip_below is not None else _FIXED,
            HAS_CE=vectors is not None,
            BLOCK_S=max(2, triton.next_power_of_2(slots)),
            BLOCK_K=128,
        )
    return main_index, main_weights, scales


class _Route(torch.autograd.Function):
    """The routing kernel forward; backward recomputes the split and the averaging in PyTorch (the
    library's own functions) and differentiates them, for the routing weights and the vectors."""

    @staticmethod
    def forward(ctx, index, weights, ce_gate, ce_up, ce_down, rule, num_experts, form):
        vectors = (ce_gate, ce_up, ce_down) if ce_gate is not None else None
        main_index, main_weights, scales = route(index, weights, rule, num_experts, vectors)
        ctx.save_for_backward(index, weights, *(vectors or ()))
        ctx.rule, ctx.num_experts, ctx.form = rule, num_experts, form
        ctx.mark_non_differentiable(main_index)
        return (main_index, main_weights, *(scales or ()))

    @staticmethod
    def backward(ctx, _grad_index, grad_weights, *grad_scales):
        index, weights, *vectors = ctx.saved_tensors
        with torch.enable_grad():
            weights = weights.detach().requires_grad_(ctx.needs_input_grad[1])
            vectors = [v.detach().requires_grad_(need) for v, need in zip(vectors, ctx.needs_input_grad[2:5])]
            split = split_routing(index, weights, *ctx.rule)
            outputs, grads = [split.main_weights], [grad_weights]
            if vectors:
                block = SimpleNamespace(
                    num_experts=ctx.num_experts, ce_gate=vectors[0], ce_up=vectors[1], ce_down=vectors[2]
                )
                outputs += ctx.form.averaged(block, split.aux_index, split.aux_weights, split.aux_skip)
                grads += grad_scales
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            inputs = [t for t in (weights, *vectors) if t.requires_grad]
            found = ()
            if pairs and inputs:
                outputs, grads = zip(*pairs)
                found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
            found = iter(found)
        result = [None, next(found, None) if ctx.needs_input_grad[1] else None]
        result += [next(found, None) if need else None for need in ctx.needs_input_grad[2:5]]
        return (*result, None, None, None)


def _grid(tiles: int, size: int):
    return lambda meta: (tiles, triton.cdiv(size, meta["BLOCK_N"]))


class _Experts(torch.autograd.Function):
    """The main experts of every token on the aligned rows, forward and backward in Triton. Returns
    ``[T, H]`` at the routing weights' precision (float32 for some routers), summed in fixed order."""

    @staticmethod
    def forward(
        ctx, x, main_weights, scale_gate, scale_up, scale_down, gate_up, down, main_index, num_experts, dynamic, grad_on
    ):
        tokens, hidden = x.shape
        inter, main = down.shape[2], main_index.shape[1]
        aligned = _Aligned(main_index, num_experts, _block_m(main_index.numel(), num_experts))
        tiles, has_ce = aligned.capacity // aligned.block_m, scale_gate is not None
        # needs_input_grad says what requires grad even under torch.no_grad(): inference saves nothing.
        save = grad_on and any(ctx.needs_input_grad)
        inner = x.new_empty(aligned.capacity, inter)
        pre_gate, pre_up = (x.new_empty(aligned.capacity, inter) for _ in range(2)) if save else (inner, inner)
        wide = torch.promote_types(x.dtype, main_weights.dtype)
        # Pairs that are not main under a per-token rule get no row: their outputs must read as zeros.
        pair_out = (torch.zeros if dynamic else torch.empty)(aligned.pairs, hidden, dtype=wide, device=x.device)
        scales = (scale_gate, scale_up, scale_down) if has_ce else (x, x, x)  # never read without them
        common = dict(
            main=main,
            hidden=hidden,
            inter=inter,
            PRECISION=_precision(x.dtype),
            UPCAST=_interpreting(),
            BLOCK_M=aligned.block_m,
        )
        layout = (aligned.sorted_pair, aligned.tile_expert)
        with _on(x.device):
            _gate_up_kernel[_grid(tiles, inter)](
                x, *scales, gate_up, *layout, inner, pre_gate, pre_up, aligned.pairs,
                num_experts=num_experts, HAS_CE=has_ce, SAVE=save, **common,
            )  # fmt: skip
            _down_kernel[_grid(tiles, hidden)](
                inner, down, main_weights, *layout, pair_out, aligned.pairs, num_experts=num_experts, **common
            )
        if save:
            ctx.save_for_backward(x, main_weights, *(scales if has_ce else ()), gate_up, down, inner, pre_gate, pre_up)
            ctx.aligned, ctx.has_ce, ctx.num_experts, ctx.common, ctx.dynamic = (
                aligned,
                has_ce,
                num_experts,
                common,
                dynamic,
            )
        return pair_out.view(tokens, main, hidden).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        aligned, has_ce, common = ctx.aligned, ctx.has_ce, ctx.common
        x, main_weights, *rest = ctx.saved_tensors
        scales, (gate_up, down, inner, pre_gate, pre_up) = (rest[:3], rest[3:]) if has_ce else ((x, x, x), rest)
        tokens, hidden = x.shape
        inter, main, pairs = common["inter"], common["main"], aligned.pairs
        tiles, device = aligned.capacity // aligned.block_m, x.device
        grad_out = grad_out.contiguous()
        layout = (aligned.sorted_pair, aligned.tile_expert)
        f32 = dict(dtype=torch.float32, device=device)
        grad_gate, grad_up = torch.empty_like(inner), torch.empty_like(inner)
        zeros_or_empty = torch.zeros if ctx.dynamic else torch.empty  # rows of pairs not main stay zero
        grad_weight = torch.zeros(pairs, triton.cdiv(inter, 16), **f32)
        grad_scale_down = zeros_or_empty(pairs, inter, **f32) if has_ce else grad_weight
        n_x = 3 if has_ce else 1
        grad_x_parts = [zeros_or_empty(pairs, hidden, **f32) for _ in range(n_x)]
        grad_x_parts += [grad_x_parts[0]] * (3 - n_x)  # pointers the kernel does not write without scales
        with _on(device):
            _down_grad_kernel[_grid(tiles, inter)](
                grad_out, down, main_weights, inner, pre_gate, pre_up, scales[2], *layout,
                grad_gate, grad_up, grad_scale_down, grad_weight, pairs,
                num_experts=ctx.num_experts, HAS_CE=has_ce, **common,
            )  # fmt: skip
            _gate_up_grad_kernel[_grid(tiles, hidden)](
                grad_gate, grad_up, gate_up, x, scales[0], scales[1], *layout, *grad_x_parts, pairs,
                num_experts=ctx.num_experts, HAS_CE=has_ce, **common,
            )  # fmt: skip
            grad_gate_up = grad_down = None
            if ctx.needs_input_grad[5]:
                grad_gate_up = torch.empty_like(gate_up)
                for half, a, scale in ((0, grad_gate, scales[0]), (inter, grad_up, scales[1])):
                    _weight_grads(
                        aligned,
                        a,
                        x,
                        None,
                        scale if has_ce else None,
                        grad_gate_up[:, half : half + inter],
                        main,
                        common,
                    )
            if ctx.needs_input_grad[6]:
                grad_down = torch.empty_like(down)
                _weight_grads(aligned, grad_out, inner, main_weights, None, grad_down, main, common)
        per_token = [part.view(tokens, main, -1).sum(dim=1) for part in grad_x_parts[:n_x]]
        grad_x = per_token[0].to(x.dtype)
        grad_scale_gate, grad_scale_up = per_token[1:] if has_ce else (None, None)
        grad_scale_down = grad_scale_down.view(tokens, main, inter).sum(dim=1) if has_ce else None
        grad_main_weights = grad_weight.sum(dim=1).view(tokens, main).to(main_weights.dtype)
        return (
            grad_x, grad_main_weights, grad_scale_gate, grad_scale_up, grad_scale_down,
            grad_gate_up, grad_down, None, None, None, None,
        )  # fmt: skip


def _weight_grads(aligned, a, b, a_weight, b_scale, out, main, common) -> None:
    """``out[e] = A_e.T @ B_e`` over each expert's rows: ``a`` sorted rows and ``b`` per token (scaled by
    ``b_scale``), or ``a`` per token weighted by the pair's ``a_weight`` and ``b`` sorted rows."""
    rows, cols = out.shape[1], out.shape[2]
    sorted_a = a_weight is None
    grid = lambda meta: (aligned.num_experts, triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))  # noqa: E731
    _weight_grad_kernel[grid](
        a, b, a_weight if a_weight is not None else a, b_scale if b_scale is not None else a,
        aligned.sorted_pair, aligned.starts, aligned.counts, out, out.stride(0), aligned.pairs,
        main=main, R=rows, C=cols, A_SORTED=sorted_a, B_SCALED=b_scale is not None,
        PRECISION=common["PRECISION"], UPCAST=common["UPCAST"], BLOCK_M=common["BLOCK_M"],
    )  # fmt: skip


class Fused(Backend):
    name = "fused"

    def unavailable(self, call: Call) -> str | None:
        layer, x = call.layer, call.x
        if not available():
            return "it needs Triton (pip install triton; CUDA builds of PyTorch bring it)"
        if call.kept_experts is not None:
            return "its kernels hold every expert in full; a model pruned with stand-ins (kept_experts) does not"
        if x.device.type != "cuda" and not (_interpreting() and x.device.type == "cpu"):
            return "it needs a CUDA device (or, slowly, TRITON_INTERPRET=1 on the CPU)"
        return kernel_reason(layer, x) or super().unavailable(call)

    def preferred(self, call: Call) -> bool:
        # Not yet measured on a GPU (scripts/device_check.sh times it against grouped): until a
        # measurement shows where it is faster, auto keeps to the measured paths.
        return False

    def run(self, call: Call) -> torch.Tensor:
        layer, x = call.layer, call.x.contiguous()
        gate_up, down = layer.gate_up_proj, layer.down_proj
        if not call.compresses:  # full top-k: every routed expert is main, nothing to split
            return _experts(x, call.top_k_index, call.top_k_weights, (), gate_up, down, False).to(x.dtype)
        vectors = layer.form_spec.kernel_vectors(layer)
        if vectors is not None or not layer.form_spec.parameters:  # ia3, none: the routing kernel splits
            main_index, main_weights, *scales = _Route.apply(
                call.top_k_index,
                call.top_k_weights,
                *(vectors or (None,) * 3),
                (call.n_ce, call.top_p, call.skip_below),
                layer.num_experts,
                layer.form_spec,
            )
            return _experts(x, main_index, main_weights, scales, gate_up, down, call.dynamic).to(x.dtype)
        # Forms whose auxiliary experts are experts of their own (slim): each of the form's runs on its own
        # aligned rows, split in PyTorch. Pairs a run skips get the id past its experts: no row.
        total = None
        for run in call.runs:
            rows = run.down.shape[0]
            index = run.index if run.skip is None else run.index.masked_fill(run.skip, rows)
            part = _experts(
                x, index, run.weights, (), run.gate_up.to(x.dtype), run.down.to(x.dtype), run.skip is not None
            )
            total = part if total is None else total + part
        return total.to(x.dtype)  # summed at the routing weights' precision, rounded once


def _experts(x, index, weights, scales, gate_up, down, dynamic: bool) -> torch.Tensor:
    """The experts ``gate_up`` ``[E, 2n, H]`` / ``down`` ``[E, H, n]`` on the (token, expert) pairs of
    ``index`` (an id ``E``: no row), weighted by ``weights``, optionally scaled by ``scales`` (g, u, d);
    at the routing weights' precision."""
    scales = scales or (None,) * 3
    weights = weights.contiguous()  # the kernels read [T, k] rows; a split's halves are strided views
    return _Experts.apply(x, weights, *scales, gate_up, down, index, down.shape[0], dynamic, torch.is_grad_enabled())
