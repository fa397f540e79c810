"""Token-to-expert grouping and the grouped matmul: the only place that cares about speed tricks.

Rows (one per token and selected expert) are sorted by expert so that each expert's
weights multiply one contiguous block of rows. ``torch.nn.functional.grouped_mm`` does all
experts in one call where the build and device support it; elsewhere a loop over the
experts' row blocks gives the same result with one host sync per call (never one per expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import CompressedExpertsError

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


@dataclass
class Grouping:
    """Rows sorted by expert.

    ``order[j]`` is the flat (token, slot) position of sorted row ``j``; ``token[j]`` its
    token; ``offsets[e]`` the end of expert ``e``'s block of rows (int32, cumulative).
    """

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    slots: int

    @classmethod
    def build(cls, expert_index: torch.Tensor, num_experts: int) -> "Grouping":
        """Group the ``[tokens, slots]`` expert ids by expert (stable, so equal ids keep token order).

        Ids must lie in ``0..num_experts-1`` (expert parallelism's "dropped" id is not supported).
        """
        slots = expert_index.shape[-1]
        flat = expert_index.reshape(-1)
        order = flat.argsort(stable=True)
        # searchsorted, not bincount: no device-to-host sync on CUDA.
        bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=flat.dtype)
        offsets = torch.searchsorted(flat[order], bounds, right=False).to(torch.int32)
        return cls(order=order, token=order // slots, offsets=offsets, slots=slots)

    def combine(self, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Sum each token's rows back into one ``[tokens, hidden]`` tensor (deterministic, no atomics)."""
        unsorted = torch.empty_like(rows).index_copy_(0, self.order, rows)
        return unsorted.view(num_tokens, self.slots, rows.shape[-1]).sum(dim=1)


def _aligned(t: torch.Tensor) -> bool:
    return all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)


def _grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: it wants 16-byte aligned rows everywhere."""
    if not _HAS_GROUPED_MM or not (_aligned(a) and _aligned(b)):
        return False
    if b.shape[-1] * a.element_size() % 16:  # the output's rows
        return False
    if a.device.type == "cpu":
        return a.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if a.device.type == "cuda":  # F.grouped_mm (torch >= 2.10) takes these dtypes on Ampere or newer
        return torch.cuda.get_device_capability(a.device) >= (8, 0) and a.dtype in (
            torch.bfloat16, torch.float32, torch.float16
        )
    return False


def _blocks(offsets: torch.Tensor):
    """(expert, start, end) of every expert that has rows: the fallback's one host sync."""
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            yield expert, start, end
        start = end


#: Compute paths: "auto" picks per call; "grouped" forces F.grouped_mm; "loop" one matmul per expert
#: with rows; "decode" the fused Triton kernels of :mod:`compressed_experts.decode_kernel` (the
#: layer runs them before any grouping; grouped products asked for under it, such as activation
#: importance's, are chosen as under "auto").
PATHS = ("auto", "grouped", "loop", "decode")


def _use_grouped(a: torch.Tensor, b: torch.Tensor, path: str) -> bool:
    if path == "loop":
        return False
    supported = _grouped_mm_supported(a, b)
    if path == "grouped":
        if not supported:
            raise CompressedExpertsError(
                f"the grouped path cannot take {a.dtype} operands of these shapes on {a.device} "
                f"(grouped_mm needs 16-byte aligned rows; on CUDA an Ampere or newer GPU): use path 'auto' or 'loop'"
            )
        return True
    # Decode-sized calls on CPU: grouped_mm there visits every expert, empty ones included, with
    # per-expert bookkeeping; looping over the experts that have rows is cheaper (one host sync).
    few_rows_on_cpu = a.device.type == "cpu" and a.shape[0] * 4 <= b.shape[0]
    return supported and not few_rows_on_cpu


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``a[rows of e] @ b[e]`` for every expert ``e``; ``a`` is ``[rows, K]``, ``b`` is ``[E, K, N]``.

    Differentiable. ``b`` may be a strided view (half of a fused ``gate_up_proj``, transposed):
    no copy of the expert weights is made.
    """
    if _use_grouped(a, b, path):
        return F.grouped_mm(a, b, offs=offsets)
    return _LoopGroupedMatmul.apply(a, b, offsets)


class _LoopGroupedMatmul(torch.autograd.Function):
    """The fallback: one matmul per expert that has rows, one host sync per call.

    Its own backward, because autograd through ``b[expert]`` would build a zero tensor of the
    whole weight's size for every expert and add them all up.
    """

    @staticmethod
    def forward(ctx, a, b, offsets):
        ctx.save_for_backward(a, b, offsets)
        out = a.new_empty(a.shape[0], b.shape[-1])  # every row lies in exactly one expert's block
        for expert, start, end in _blocks(offsets):
            torch.mm(a[start:end], b[expert], out=out[start:end])
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offsets = ctx.saved_tensors
        needs_a, needs_b, _ = ctx.needs_input_grad
        grad_a = torch.empty_like(a) if needs_a else None
        grad_b = _empty_experts_zeroed(b, offsets) if needs_b else None
        for expert, start, end in _blocks(offsets):
            if needs_a:
                torch.mm(grad[start:end], b[expert].T, out=grad_a[start:end])
            if needs_b:
                grad_b[expert] = a[start:end].T @ grad[start:end]
        return grad_a, grad_b, None


def _empty_experts_zeroed(like: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[E, ...]`` gradient buffer with the blocks of experts that got no row zeroed:
    the others are about to be overwritten, so zeroing the whole weight-sized buffer would be a wasted pass."""
    grad = torch.empty_like(like)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    # index_fill_ touches the empty experts' blocks only; ``grad[counts == 0] = 0`` ran a masked
    # fill over the whole weight-sized buffer (0.1 s of a 0.8 s training step at 512 tokens on CPU).
    return grad.index_fill_(0, (counts == 0).nonzero().squeeze(1), 0)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``x[rows of e] @ weight[e].T`` for every expert ``e``; ``weight`` is ``[E, out, in]``."""
    return grouped_matmul(x, weight.transpose(-2, -1), offsets, path)


def _fused_weight_grad(grad_gate, x_gate, grad_up, x_up, offsets, gate_up, path) -> torch.Tensor:
    """Gradient of a fused ``[E, 2I, H]`` weight, each expert's two halves written in place.

    On CPU, one buffer the size of the weight filled by ``mm(..., out=)`` per expert (one host
    sync) measured faster than two grouped products and a concatenation, whose weight-sized
    temporaries cost more than the loop; on a GPU the loop's launches and sync cost more.
    """
    if path != "loop" and gate_up.device.type != "cpu" and _grouped_mm_supported(grad_gate.T, x_gate):
        return torch.cat(
            [F.grouped_mm(grad_gate.T, x_gate, offs=offsets), F.grouped_mm(grad_up.T, x_up, offs=offsets)], dim=1
        )
    inter = gate_up.shape[1] // 2
    grad = _empty_experts_zeroed(gate_up, offsets)
    for expert, start, end in _blocks(offsets):
        torch.mm(grad_gate[start:end].T, x_gate[start:end], out=grad[expert, :inter])
        torch.mm(grad_up[start:end].T, x_up[start:end], out=grad[expert, inter:])
    return grad


class _SplitGateUp(torch.autograd.Function):
    """Gate and up projections of different inputs through one fused ``gate_up_proj`` ``[E, 2I, H]``.

    Compressed experts scale the gate's and the up projection's inputs differently, so the fused
    matmul splits in two. Autograd through two slices of the weight would allocate two zero
    tensors of the whole weight's size and add them; this writes one gradient, once.
    """

    @staticmethod
    def forward(ctx, x_gate, x_up, gate_up, offsets, path):
        inter = gate_up.shape[1] // 2
        ctx.save_for_backward(x_gate, x_up, gate_up, offsets)
        ctx.path = path
        gate = grouped_linear(x_gate, gate_up[:, :inter], offsets, path)
        up = grouped_linear(x_up, gate_up[:, inter:], offsets, path)
        return gate, up

    @staticmethod
    def backward(ctx, grad_gate, grad_up):
        x_gate, x_up, gate_up, offsets = ctx.saved_tensors
        inter = gate_up.shape[1] // 2
        grad_gate, grad_up = grad_gate.contiguous(), grad_up.contiguous()
        needs_x_gate, needs_x_up, needs_weight, _, _ = ctx.needs_input_grad
        path = ctx.path
        d_gate = grouped_matmul(grad_gate, gate_up[:, :inter], offsets, path) if needs_x_gate else None
        d_up = grouped_matmul(grad_up, gate_up[:, inter:], offsets, path) if needs_x_up else None
        # Frozen experts (training only the compressed experts) skip the largest cost.
        d_weight = None
        if needs_weight:
            d_weight = _fused_weight_grad(grad_gate, x_gate, grad_up, x_up, offsets, gate_up, path)
        return d_gate, d_up, d_weight, None, None


def split_gate_up(
    x_gate: torch.Tensor, x_up: torch.Tensor, gate_up: torch.Tensor, offsets: torch.Tensor, path: str = "auto"
):
    """``(x_gate @ W_gate[e].T, x_up @ W_up[e].T)`` per expert block, with ``gate_up`` = ``[W_gate; W_up]``."""
    return _SplitGateUp.apply(x_gate, x_up, gate_up, offsets, path)
