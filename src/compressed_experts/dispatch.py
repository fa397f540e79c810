"""Token-to-expert grouping and the grouped matmul: the only place that cares about speed tricks.

Rows (one per token and selected expert) are sorted by expert so that each expert's
weights multiply one contiguous block of rows. ``torch.nn.functional.grouped_mm`` does all
experts in one call where the build and device support it; elsewhere a loop over the
experts' row blocks gives the same result with one host sync for the whole layer (never
one per expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: it wants 16-byte aligned rows everywhere."""
    if not _HAS_GROUPED_MM or not (_aligned(x) and _aligned(weight)):
        return False
    if weight.shape[-2] * x.element_size() % 16:  # the output's rows
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":  # the CUDA kernel needs bf16 and Hopper or newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of e] @ weight[e].T`` for every expert ``e``; ``weight`` is ``[E, out, in]``.

    Differentiable in ``x`` and ``weight``. ``weight`` may be a strided view (the gate or up
    half of a fused ``gate_up_proj``): no copy of the expert weights is made.
    """
    if _grouped_mm_supported(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()  # the one host sync of the fallback
    out = []
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            out.append(x[start:end] @ weight[expert].T)
        start = end
    if not out:
        return x.new_zeros(x.shape[0], weight.shape[-2])
    return torch.cat(out)
