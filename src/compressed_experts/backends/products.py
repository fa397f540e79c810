"""Grouped expert products, shared by the ``grouped`` and ``loop`` backends.

Rows (one per token and selected expert) are sorted by expert so that each expert's weights
multiply one contiguous block of rows. ``torch.nn.functional.grouped_mm`` does all experts in
one call where the build and device support it (``grouped=True``); a loop over the experts'
row blocks gives the same result with one host sync per call, never one per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..routing import ExpertRun

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


@dataclass
class Grouping:
    """Rows sorted by expert.

    ``order[j]`` is the flat (token, slot) position of sorted row ``j``; ``token[j]`` its
    token; ``offsets[e]`` the end of expert ``e``'s block of rows (int32, cumulative).

    With pairs skipped (``source`` set), a skipped pair's row sorts after the last expert's block,
    where no product computes it (grouped_mm and the loop leave such rows uninitialised, forward
    and in the input's gradient), and is never read: its ``token`` is a zero row appended to the
    per-token inputs, and ``source[p]``, the sorted row of flat pair ``p``, points a skipped pair
    at a zero row appended to the output. Whatever gradient such a row gets lands in those
    appended rows, which are dropped: it reaches neither the inputs nor the routing weights.
    """

    order: torch.Tensor
    token: torch.Tensor
    offsets: torch.Tensor
    slots: int
    source: torch.Tensor | None = None

    @classmethod
    def build(cls, expert_index: torch.Tensor, num_experts: int, skip: torch.Tensor | None = None) -> Grouping:
        """Group the ``[tokens, slots]`` expert ids by expert (stable, so equal ids keep token order).

        Ids must lie in ``0..num_experts-1`` (expert parallelism's "dropped" id is not supported).
        Pairs marked in ``skip`` get the id ``num_experts``, past every expert's block.
        """
        tokens, slots = expert_index.shape
        flat = expert_index.reshape(-1)
        if skip is not None:
            skip = skip.reshape(-1)
            flat = flat.masked_fill(skip, num_experts)
        order = flat.argsort(stable=True)
        # searchsorted, not bincount: no device-to-host sync on CUDA.
        bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=flat.dtype)
        offsets = torch.searchsorted(flat[order], bounds, right=False).to(torch.int32)
        token, source = order // slots, None
        if skip is not None:  # device-side index arithmetic only: no count reaches the host
            token = token.masked_fill(skip[order], tokens)
            rows = torch.arange(order.numel(), device=order.device)
            source = torch.empty_like(order).scatter_(0, order, rows).masked_fill_(skip, order.numel())
        return cls(order=order, token=token, offsets=offsets, slots=slots, source=source)

    def rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """``per_token`` ``[tokens, n]`` gathered to the sorted rows (skipped pairs: a zero row).

        Gathered by indexing, not ``index_select``: the latter's backward (``index_add_``, a parallel
        ``scatter_add_`` on CPU) stalled 100-fold when another process held the cores (a one-token
        training step under a per-token rule, toy layer, two threads: 200 ms against 1.4 ms)."""
        if self.source is None:
            return per_token[self.token]
        return _with_zero_row(per_token)[self.token]

    def combine(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_j w_j row_j`` for each token, ``[tokens, hidden]``, weighted and summed at the routing
        weights' precision (float32 for some routers; deterministic, no atomics). ``weights`` is
        ``[tokens, slots]``; skipped pairs add exact zeros."""
        wide = torch.promote_types(rows.dtype, weights.dtype)
        if self.source is None:
            rows = rows.to(wide) * weights.reshape(-1)[self.order].unsqueeze(-1).to(wide)
            unsorted = torch.empty_like(rows).index_copy_(0, self.order, rows)
        else:  # weighted after the gather: a skipped row is a zero there, never 0 x uninitialised memory
            unsorted = _with_zero_row(rows)[self.source].to(wide) * weights.reshape(-1, 1).to(wide)  # see rows()
        return unsorted.view(weights.shape[0], self.slots, rows.shape[-1]).sum(dim=1)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(1, t.shape[-1])])


def _aligned(t: torch.Tensor) -> bool:
    return all(stride * t.element_size() % 16 == 0 for stride in t.stride() if stride != 1)


def _device_takes(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``F.grouped_mm`` runs on ``device`` in ``dtype`` (torch >= 2.10; CUDA: Ampere or newer)."""
    if not HAS_GROUPED_MM:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype in (
            torch.bfloat16,
            torch.float32,
            torch.float16,
        )
    return False


def grouped_mm_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes ``a`` ``[rows, K]`` and ``b`` ``[E, K, N]``: 16-byte aligned rows everywhere."""
    aligned = _aligned(a) and _aligned(b) and b.shape[-1] * a.element_size() % 16 == 0  # the output's rows too
    return aligned and _device_takes(a.dtype, a.device)


def grouped_mm_reason(x: torch.Tensor, runs: list[ExpertRun]) -> str | None:
    """Why ``grouped_mm`` cannot take every product of these runs on ``x``'s rows, or None if it can.

    Worked out from dtypes, shapes and strides alone (no tensor is made): the rows are gathered
    into fresh contiguous ``[rows, in]`` tensors, and a weight of another dtype is cast per call
    into a fresh contiguous copy.
    """
    if not HAS_GROUPED_MM:
        return "this PyTorch has no torch.nn.functional.grouped_mm (2.10 or newer has)"
    dtype_ok = _device_takes(x.dtype, x.device)
    size = x.element_size()
    for run in runs:
        weights = list(run.weight_tensors())
        if run.scales is not None and not isinstance(run.gate_up, tuple):  # scaled: each half apart
            weights.append(run.gate_up[:, : run.gate_up.shape[1] // 2])
        for weight in weights:
            out_features, in_features = weight.shape[-2:]
            strides = weight.stride() if weight.dtype == x.dtype else (out_features * in_features, in_features)
            aligned = all(stride * size % 16 == 0 for stride in strides if stride != 1)
            if not (dtype_ok and aligned and in_features * size % 16 == 0 and out_features * size % 16 == 0):
                return (
                    f"grouped_mm cannot take {x.dtype} operands of shape {list(weight.shape)} on {x.device} "
                    f"(it needs 16-byte aligned rows; on CUDA an Ampere or newer GPU)"
                )
    return None


def _blocks(offsets: torch.Tensor):
    """(expert, start, end) of every expert that has rows: the loop's one host sync."""
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            yield expert, start, end
        start = end


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    """``a[rows of e] @ b[e]`` for every expert ``e``; ``a`` is ``[rows, K]``, ``b`` is ``[E, K, N]``.

    Differentiable. ``b`` may be a strided view (half of a fused ``gate_up_proj``, transposed):
    no copy of the expert weights is made.
    """
    if grouped:
        return F.grouped_mm(a, b, offs=offsets)
    return _LoopGroupedMatmul.apply(a, b, offsets)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    """``x[rows of e] @ weight[e].T`` for every expert ``e``; ``weight`` is ``[E, out, in]``."""
    return grouped_matmul(x, weight.transpose(-2, -1), offsets, grouped)


class _LoopGroupedMatmul(torch.autograd.Function):
    """The loop: one matmul per expert that has rows, one host sync per call.

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


def _fused_weight_grad(grad_gate, x_gate, grad_up, x_up, offsets, gate_up, grouped) -> torch.Tensor:
    """Gradient of a fused ``[E, 2I, H]`` weight, each expert's two halves written in place.

    Whatever the forward's products, on CPU one buffer the size of the weight filled by
    ``mm(..., out=)`` per expert (one host sync) measured faster than two grouped products and a
    concatenation, whose weight-sized temporaries cost more than the loop; on a GPU the loop's
    launches and sync cost more, so the grouped backend uses grouped_mm there.
    """
    if grouped and gate_up.device.type != "cpu" and grouped_mm_takes(grad_gate.T, x_gate):
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
    def forward(ctx, x_gate, x_up, gate_up, offsets, grouped):
        inter = gate_up.shape[1] // 2
        ctx.save_for_backward(x_gate, x_up, gate_up, offsets)
        ctx.grouped = grouped
        gate = grouped_linear(x_gate, gate_up[:, :inter], offsets, grouped)
        up = grouped_linear(x_up, gate_up[:, inter:], offsets, grouped)
        return gate, up

    @staticmethod
    def backward(ctx, grad_gate, grad_up):
        x_gate, x_up, gate_up, offsets = ctx.saved_tensors
        inter = gate_up.shape[1] // 2
        grad_gate, grad_up = grad_gate.contiguous(), grad_up.contiguous()
        needs_x_gate, needs_x_up, needs_weight, _, _ = ctx.needs_input_grad
        grouped = ctx.grouped
        d_gate = grouped_matmul(grad_gate, gate_up[:, :inter], offsets, grouped) if needs_x_gate else None
        d_up = grouped_matmul(grad_up, gate_up[:, inter:], offsets, grouped) if needs_x_up else None
        # Frozen experts (training only the compressed experts) skip the largest cost.
        d_weight = None
        if needs_weight:
            d_weight = _fused_weight_grad(grad_gate, x_gate, grad_up, x_up, offsets, gate_up, grouped)
        return d_gate, d_up, d_weight, None, None


def run_experts(x: torch.Tensor, run: ExpertRun, act_fn: Callable, grouped: bool) -> torch.Tensor:
    """One :class:`ExpertRun` on ``x`` ``[T, H]``, all experts at once.

    The result is left at the routing weights' precision (float32 for some routers), for the
    caller to sum the runs and round once.
    """
    groups = Grouping.build(run.index, run.experts, run.skip)
    gate_up, down = run.gate_up, run.down
    if down.dtype != x.dtype:  # slim's float32 master copies under --precision bf16
        gate_up = tuple(w.to(x.dtype) for w in gate_up) if isinstance(gate_up, tuple) else gate_up.to(x.dtype)
        down = down.to(x.dtype)
    scales = None if run.scales is None else tuple(s.to(x.dtype) for s in run.scales)
    if not grouped and by_expert(x, run):
        return _by_expert(x, run, groups, gate_up, down, act_fn, scales)
    if scales is not None:
        scale_gate, scale_up, scale_down = scales
        # Scale once per token ([T, H]), then gather the (token, expert) rows: the scaling costs a
        # pass over T rows rather than over T * m.
        gate, up = _SplitGateUp.apply(
            groups.rows(x * scale_gate), groups.rows(x * scale_up), gate_up, groups.offsets, grouped
        )
        inner = act_fn(gate) * up * groups.rows(scale_down)
    else:
        rows = groups.rows(x)
        if isinstance(gate_up, tuple):
            gate, up = (grouped_linear(rows, w, groups.offsets, grouped) for w in gate_up)
        else:
            gate, up = grouped_linear(rows, gate_up, groups.offsets, grouped).chunk(2, dim=-1)
        inner = act_fn(gate) * up
    if run.neuron_limit is not None:
        slot, r = run.neuron_limit
        cut = (groups.order % groups.slots >= slot).unsqueeze(-1) & (
            torch.arange(inner.shape[-1], device=inner.device) >= r
        )
        inner = inner.masked_fill(cut, 0)
    return groups.combine(grouped_linear(inner, down, groups.offsets, grouped), run.weights)


def computed_rows(run: ExpertRun) -> int:
    """The (token, expert) rows a run's products compute: its pairs less those a per-token rule skips
    (counted on the host: a sync, so only for choices made on the CPU)."""
    rows = run.index.numel()
    return rows if run.skip is None else rows - int(run.skip.sum())


def by_expert(x: torch.Tensor, run: ExpertRun) -> bool:
    """Whether the loop runs each expert's whole MLP at once (:func:`_by_expert`): inference on CPU at 64
    computed rows per expert or more, for runs without a neuron limit (only set with gradients on).
    On two threads, OLMoE layer, bfloat16 unless said (``python scripts/profile_layer.py --tokens N
    --variants full@grouped,full@loop [--dtype float32]``, one run each): grouped_mm then the loop
    at 512 tokens (64 rows per expert) 446 and 375 ms, at 2,048 1,466 and 1,362 ms, float32 at 1,024
    687 and 501 ms; the machine's noise between runs is several percent. Below 64 rows per expert
    the loop was slower than grouped_mm in the probes that set the threshold (compressed experts'
    32-row runs at 512 tokens). With more cores the per-expert products are smaller shares of the
    machine, which may move the crossover up: measure with ``compressed-experts bench`` there."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or run.neuron_limit is not None:
        return False
    return computed_rows(run) >= 64 * run.experts


def _by_expert(
    x: torch.Tensor, run: ExpertRun, groups: Grouping, gate_up, down, act_fn: Callable, scales: tuple | None
) -> torch.Tensor:
    """The loop for large inference calls on CPU: each expert's whole MLP (gather, gate and up, activation, down, routing
    weight) on its block of rows before the next expert's; the weighted rows are summed per token at the
    end, in slot order, as :meth:`Grouping.combine` sums them (the same sums as the other paths).

    Why: projection by projection over all rows, a call's intermediates (``[T*k, 2I]``, then ``[T*k, H]``
    twice more for the weighting and the unsorting) leave the cache between steps; expert by expert they
    stay in it, and only one ``[T*k, H]`` buffer is written, once (transformers' eager experts work this
    way, and were the fastest full top-k at 512 and 2,048 tokens on the two-core CPU, BENCHMARKS.md).
    """
    tokens, slots = run.index.shape
    wide = torch.promote_types(x.dtype, run.weights.dtype)
    # Pairs no product computes (skipped by a rule) must add exact zeros: only then is the buffer zeroed.
    weighted = (x.new_empty if groups.source is None else x.new_zeros)(tokens * slots, down.shape[1], dtype=wide)
    weights = run.weights.reshape(-1, 1).to(wide)
    x_gate = x_up = x
    scale_down = None
    if scales is not None:
        scale_gate, scale_up, scale_down = scales
        x_gate, x_up = x * scale_gate, x * scale_up
    for expert, start, end in _blocks(groups.offsets):
        token, pairs = groups.token[start:end], groups.order[start:end]
        rows = x_gate[token]
        rows_up = rows if x_up is x_gate else x_up[token]  # unscaled: one gather serves both
        if isinstance(gate_up, tuple):
            gate, up = rows @ gate_up[0][expert].T, rows_up @ gate_up[1][expert].T
        elif rows_up is rows:
            gate, up = (rows @ gate_up[expert].T).chunk(2, dim=-1)
        else:
            inter = gate_up.shape[1] // 2
            gate, up = rows @ gate_up[expert, :inter].T, rows_up @ gate_up[expert, inter:].T
        inner = act_fn(gate).mul_(up)
        if scale_down is not None:
            inner.mul_(scale_down[token])
        weighted.index_copy_(0, pairs, (inner @ down[expert].T).to(wide) * weights[pairs])
    return weighted.view(tokens, slots, -1).sum(dim=1)


def run_all(x: torch.Tensor, runs: list[ExpertRun], act_fn: Callable, grouped: bool | list[bool]) -> torch.Tensor:
    """The sum of the runs, computed wide and rounded once to ``x``'s dtype; ``grouped`` says, for all
    runs or run by run, whether their products go through grouped_mm or the loop."""
    choices = grouped if isinstance(grouped, list) else [grouped] * len(runs)
    total = None
    for run, choice in zip(runs, choices):
        part = run_experts(x, run, act_fn, choice)
        total = part if total is None else total + part
    return total.to(x.dtype)
