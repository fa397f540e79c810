"""``decode``: fused Triton kernels for decode-sized calls on a GPU, the whole experts step in two launches.

At a few tokens per call a GPU spends its time launching kernels, not multiplying: the grouped
path runs some twenty small kernels (sort, split, aggregate, gather, three grouped products,
combine) around about 30 microseconds of weight reading. Here the first kernel splits each
token's routing into main and auxiliary experts itself (by rank of weight, ties in slot order,
as :func:`compressed_experts.routing.split_routing`), averages the auxiliary vectors, scales the
token while loading it and computes ``silu(gate) * up * d`` for every main (token, expert) pair;
the second multiplies by each main expert's down projection, weights by the routing weight
and sums over the token's experts. Each pair reads its expert's weights once, in rows, so the
path pays when few pairs share an expert: decode. Forward only (inference); float32
accumulation whatever the weights' dtype.

Triton is optional: :func:`available` says whether this process can use the kernels. The
kernels take a fixed number of main experts per token (``n_ce``): a block with a per-token rule
(``top_p``, ``skip_below``) is not theirs (``unavailable`` says so, and ``auto`` passes on to the
grouped or loop path).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import CompressedExpertsError
from ..routing import Call
from .base import Backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the layer never asks for this path there
    _HAS_TRITON = False
else:
    _HAS_TRITON = True

if _HAS_TRITON:

    @triton.jit
    def _slot_ranks(weights_row, slots: tl.constexpr, BLOCK_S: tl.constexpr):
        """Rank of every routing slot of one token by weight (0 the heaviest; ties: lower slot first)."""
        s = tl.arange(0, BLOCK_S)
        w = tl.load(weights_row + s, mask=s < slots, other=float("-inf")).to(tl.float32)
        ahead = (w[None, :] > w[:, None]) | ((w[None, :] == w[:, None]) & (s[None, :] < s[:, None]))
        return s, w, tl.sum((ahead & (s[None, :] < slots)).to(tl.int32), axis=1)

    @triton.jit
    def _gate_up_kernel(
        x,
        index,
        weights,
        gate_up,
        ce_gate,
        ce_up,
        ce_down,
        inner,
        slots: tl.constexpr,
        main: tl.constexpr,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        HAS_CE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)  # token * slots + slot; int64: offsets below can pass 2**31
        token = pair // slots
        slot = pair % slots
        s, w, rank = _slot_ranks(weights + token * slots, slots, BLOCK_S)
        my_rank = tl.sum(tl.where(s == slot, rank, 0))
        if my_rank < main:  # auxiliary slots have no row of their own
            expert = tl.load(index + pair).to(tl.int64)
            experts = tl.load(index + token * slots + s, mask=s < slots, other=0).to(tl.int64)
            aux = (rank >= main) & (s < slots)
            share = tl.where(aux, w + 1e-30, 0.0)  # renormalised auxiliary weights, as the layer does
            total = tl.sum(share)
            share = share / tl.where(total > 0, total, 1.0)  # no auxiliary slot (n_ce 0): unused zeros
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
            w_gate = gate_up + expert * 2 * inter * hidden
            w_up = w_gate + inter * hidden
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x + token * hidden + k, mask=k < hidden, other=0.0).to(tl.float32)
                x_gate = xk
                x_up = xk
                if HAS_CE:
                    vec = experts[:, None] * hidden + k[None, :]
                    both = aux[:, None] & (k[None, :] < hidden)
                    g = tl.load(ce_gate + vec, mask=both, other=0.0).to(tl.float32)
                    u = tl.load(ce_up + vec, mask=both, other=0.0).to(tl.float32)
                    x_gate = xk * tl.sum(share[:, None] * g, 0)
                    x_up = xk * tl.sum(share[:, None] * u, 0)
                tile = n[:, None] * hidden + k[None, :]
                ok = (n[:, None] < inter) & (k[None, :] < hidden)
                acc_gate += tl.sum(tl.load(w_gate + tile, mask=ok, other=0.0).to(tl.float32) * x_gate[None, :], 1)
                acc_up += tl.sum(tl.load(w_up + tile, mask=ok, other=0.0).to(tl.float32) * x_up[None, :], 1)
            h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
            if HAS_CE:
                vec = experts[:, None] * inter + n[None, :]
                both = aux[:, None] & (n[None, :] < inter)
                h = h * tl.sum(share[:, None] * tl.load(ce_down + vec, mask=both, other=0.0).to(tl.float32), 0)
            tl.store(inner + pair * inter + n, h, mask=n < inter)

    @triton.jit
    def _down_kernel(
        inner,
        index,
        weights,
        down,
        out,
        slots: tl.constexpr,
        main: tl.constexpr,
        hidden: tl.constexpr,
        inter: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        s, w, rank = _slot_ranks(weights + token * slots, slots, BLOCK_S)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for slot in range(0, slots):
            my_rank = tl.sum(tl.where(s == slot, rank, 0))
            if my_rank < main:
                pair = token * slots + slot
                expert = tl.load(index + pair).to(tl.int64)
                weight = tl.load(weights + pair).to(tl.float32)
                part = tl.zeros([BLOCK_N], dtype=tl.float32)
                for k0 in range(0, inter, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    hk = tl.load(inner + pair * inter + k, mask=k < inter, other=0.0)
                    tile = expert * hidden * inter + n[:, None] * inter + k[None, :]
                    ok = (n[:, None] < hidden) & (k[None, :] < inter)
                    part += tl.sum(tl.load(down + tile, mask=ok, other=0.0).to(tl.float32) * hk[None, :], 1)
                acc += weight * part
        tl.store(out + token * hidden + n, acc.to(out.dtype.element_ty), mask=n < hidden)


def available() -> bool:
    """Whether Triton is installed (the path itself also needs the operands on a CUDA device)."""
    return _HAS_TRITON


def fused_decode(
    x: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    n_ce: int,
    vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The experts' output for ``x`` ``[T, H]`` routed to ``index``/``weights`` ``[T, k]``.

    The ``k - n_ce`` heaviest experts of each token run in full; with ``vectors`` (``ce_gate``,
    ``ce_up``, ``ce_down``) the rest are the ``ia3`` compressed experts, without them they are
    dropped (top-m). Weights ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]``, contiguous.
    Returns ``[T, H]`` in ``x``'s dtype.
    """
    if vectors is not None and n_ce == 0:
        raise CompressedExpertsError("compressed-expert vectors with n_ce = 0: no slot is auxiliary; pass vectors=None")
    tokens, slots = index.shape
    hidden, inter = down.shape[1], down.shape[2]
    x, index, weights = x.contiguous(), index.contiguous(), weights.contiguous()
    inner = torch.empty(tokens * slots, inter, dtype=torch.float32, device=x.device)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    # Without vectors the kernel never reads these pointers (HAS_CE is off); x stands in.
    ce_gate, ce_up, ce_down = (v.contiguous() for v in vectors) if vectors is not None else (x, x, x)
    block_s = max(2, triton.next_power_of_2(slots))  # padded slots are masked
    device = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device:  # Triton launches on the current device, which need not be x's (models split over GPUs)
        _gate_up_kernel[(tokens * slots, triton.cdiv(inter, 16))](
            x,
            index,
            weights,
            gate_up,
            ce_gate,
            ce_up,
            ce_down,
            inner,
            slots,
            slots - n_ce,
            hidden,
            inter,
            HAS_CE=vectors is not None,
            BLOCK_S=block_s,
            BLOCK_N=16,
            BLOCK_K=256,
        )
        # Blocks of 16 and 8 output rows: at one token that is still a few hundred programs, enough to
        # keep the reads of the weights in flight on a large GPU.
        _down_kernel[(tokens, triton.cdiv(hidden, 8))](
            inner,
            index,
            weights,
            down,
            out,
            slots,
            slots - n_ce,
            hidden,
            inter,
            BLOCK_S=block_s,
            BLOCK_N=8,
            BLOCK_K=256,
        )
    return out


#: What the kernels compute in (accumulating in float32): float64 would lose precision there.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _is_silu(act) -> bool:
    """transformers' "silu" is its own SiLUActivation class in some versions, torch's nn.SiLU in others."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def kernel_reason(layer, x: torch.Tensor) -> str | None:
    """Why this library's Triton kernels (these and the ``fused`` backend's) cannot take a block's
    experts and input, or None: they compute SiLU-gated experts on contiguous weights of the input's dtype."""
    if not _is_silu(layer.act_fn):
        return f"the kernels compute SiLU-gated experts, not {type(layer.act_fn).__name__}"
    if not (layer.gate_up_proj.is_contiguous() and layer.down_proj.is_contiguous()):
        return "the expert weights are not contiguous"
    if not (x.dtype == layer.gate_up_proj.dtype == layer.down_proj.dtype in _KERNEL_DTYPES):
        return "the kernels take inputs and expert weights of one dtype: bfloat16, float16 or float32"
    return None


class Decode(Backend):
    name = "decode"

    def unavailable(self, call: Call) -> str | None:
        layer, x = call.layer, call.x
        if call.dynamic:
            return "the kernels take a fixed n_ce, not a per-token rule (top_p, skip_below, kept_experts)"
        if torch.is_grad_enabled():
            return "gradients are on (the kernels are forward only: run under torch.no_grad())"
        if x.device.type != "cuda" or not available():
            return "it needs Triton and a CUDA device"
        return kernel_reason(layer, x) or super().unavailable(call)

    def preferred(self, call: Call) -> bool:
        # Measured on an H100 (scripts/device_check.sh, BENCHMARKS.md): the kernels beat grouped_mm at
        # every size tried up to 16 tokens, both layer shapes and dtypes: up to 2 E main rows.
        return call.main_rows <= 2 * call.layer.num_experts

    def run(self, call: Call) -> torch.Tensor:
        layer = call.layer
        vectors = layer.form_spec.kernel_vectors(layer) if call.compresses else None
        return fused_decode(
            call.x, call.top_k_index, call.top_k_weights, layer.gate_up_proj, layer.down_proj, call.n_ce, vectors
        )
