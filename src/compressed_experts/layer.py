"""The compressed-experts experts module: split main/auxiliary, aggregate, run the main experts.

It replaces the ``experts`` submodule of a transformers MoE block and takes the same call,
``experts(hidden_states, top_k_index, top_k_weights)``. The block's own forward is left as it
is, so each family's router (softmax/top-k, renormalisation, PhiMoE's sparsemixer,
DeepSeek's grouped routing) and shared experts run exactly as before; this module only
changes what is done with the routing it is handed. It knows nothing of any one family.
"""

from __future__ import annotations

import torch
from torch import nn

from . import decode_kernel
from .config import NEURON_FORMS
from .dispatch import PATHS, Grouping, grouped_linear, split_gate_up
from .errors import CompressedExpertsError


#: Names of the parameters compressed experts add: the ``ia3`` vectors and the ``slim`` MLPs.
CE_PARAMETERS = ("ce_gate", "ce_up", "ce_down", "ce_gate_up_proj", "ce_down_proj")


def is_compressed_expert(name: str) -> bool:
    """Whether a (dotted) parameter name belongs to compressed experts."""
    return name.rsplit(".", 1)[-1] in CE_PARAMETERS


class CompressedExperts(nn.Module):
    """Run the ``m = k - n_ce`` heaviest routed experts in full; stand in for the rest by ``form``.

    Parameters are the original expert weights (shared, not copied) plus what the form adds:

    - ``ia3``: three vectors per expert, ``ce_gate`` ``[E, H]``, ``ce_up`` ``[E, H]`` and
      ``ce_down`` ``[E, I]``, averaged over a token's auxiliary experts by routing weight and
      used to scale its main experts' projections. They start at 1.0, so a fresh conversion
      only changes how many full experts run.
    - ``none``: nothing; the top-m baseline.
    - ``subset``: nothing; an auxiliary expert runs its first ``r`` intermediate neurons, and
      :func:`compressed_experts.neurons.select_neurons` reorders each expert's neurons (which
      leaves the full expert's function unchanged) so that the first ``r`` are the important ones.
    - ``slim``: a gated MLP of ``r`` neurons per expert, ``ce_gate_up_proj`` ``[E, 2r, H]`` and
      ``ce_down_proj`` ``[E, H, r]``, a copy of the first ``r`` neurons to start with.

    In the last two, an auxiliary expert's output is weighted by its routing weight and added,
    exactly like a main expert's: with ``r = I`` both give the full top-k model back.
    """

    def __init__(self, experts: nn.Module, n_ce: int, form: str = "ia3", r: int | None = None) -> None:
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj  # [E, 2I, H], gate rows first
        self.down_proj = experts.down_proj  # [E, H, I]
        self.act_fn = experts.act_fn
        self.num_experts, two_i, self.hidden_dim = self.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.n_ce = n_ce
        self.form = form
        self.r = r if form in NEURON_FORMS else None
        if form in NEURON_FORMS and not (isinstance(r, int) and 1 <= r <= self.intermediate_dim):
            raise CompressedExpertsError(f"form {form} needs r between 1 and {self.intermediate_dim}, got {r!r}")
        self.path = "auto"  # compute path of the expert matmuls, see set_compute_path
        # Distillation (training only): when on, each training forward also runs the full top-k
        # block without gradients and leaves the relative squared distance to it here.
        self.distill = False
        self.distill_loss: torch.Tensor | None = None
        like = dict(dtype=self.gate_up_proj.dtype, device=self.gate_up_proj.device)
        if form == "ia3":
            self.ce_gate = nn.Parameter(torch.ones(self.num_experts, self.hidden_dim, **like))
            self.ce_up = nn.Parameter(torch.ones(self.num_experts, self.hidden_dim, **like))
            self.ce_down = nn.Parameter(torch.ones(self.num_experts, self.intermediate_dim, **like))
        elif form == "slim":
            gate, up, down = self.subset_weights()
            self.ce_gate_up_proj = nn.Parameter(torch.cat([gate, up], dim=1).detach().clone())
            self.ce_down_proj = nn.Parameter(down.detach().clone())

    def extra_repr(self) -> str:
        neurons = f", r={self.r}" if self.r is not None else ""
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, n_ce={self.n_ce}, form={self.form}{neurons}, path={self.path}"
        )

    def subset_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of every expert's first ``r`` neurons: gate ``[E, r, H]``, up ``[E, r, H]``, down ``[E, H, r]``."""
        inter, r = self.intermediate_dim, self.r
        return self.gate_up_proj[:, :r], self.gate_up_proj[:, inter : inter + r], self.down_proj[:, :, :r]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self._takes_decode_kernel(hidden_states, top_k_index):
            vectors = (self.ce_gate, self.ce_up, self.ce_down) if self.form == "ia3" and self.n_ce else None
            return decode_kernel.fused_decode(
                hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.n_ce, vectors)
        if self.n_ce == 0:
            return self.full(hidden_states, top_k_index, top_k_weights)
        out = self._compressed(hidden_states, top_k_index, top_k_weights)
        if self.distill and self.training:
            with torch.no_grad():
                target = self.full(hidden_states, top_k_index, top_k_weights).float()
            # Relative to the target's mean square, so one weight means the same in every block and model.
            self.distill_loss = (out.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)
        return out

    def _takes_decode_kernel(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        """Whether this call runs the fused decode kernels: path ``decode``, or ``auto`` on a decode-sized
        call; either way only where they compute this module's function (an error if ``decode`` was forced)."""
        if self.path not in ("auto", "decode"):
            return False
        reason = None
        if torch.is_grad_enabled():
            reason = "gradients are on (the kernels are forward only: run under torch.no_grad())"
        elif hidden_states.device.type != "cuda" or not decode_kernel.available():
            reason = "it needs Triton and a CUDA device"
        elif self.form in NEURON_FORMS and self.n_ce:
            reason = f"the {self.form} form has no fused kernel"
        elif not _is_silu(self.act_fn):
            reason = f"the kernels compute SiLU-gated experts, not {type(self.act_fn).__name__}"
        elif not (self.gate_up_proj.is_contiguous() and self.down_proj.is_contiguous()):
            reason = "the expert weights are not contiguous"
        elif not (hidden_states.dtype == self.gate_up_proj.dtype == self.down_proj.dtype in _KERNEL_DTYPES):
            reason = "the kernels take inputs and expert weights of one dtype: bfloat16, float16 or float32"
        if self.path == "decode" and reason is not None:
            raise CompressedExpertsError(f"the decode path cannot run here: {reason}; use path 'auto'")
        # Measured on an H100 (scripts/device_check.sh, BENCHMARKS.md): the kernels beat the grouped path
        # at every size tried, up to 16 tokens, both layer shapes and dtypes: up to 2 E rows for full top-k.
        rows = top_k_index.shape[0] * (top_k_index.shape[1] - self.n_ce)
        return reason is None and (self.path == "decode" or rows <= 2 * self.num_experts)

    def _compressed(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        main_index, main_weights, aux_index, aux_weights = split_routing(top_k_index, top_k_weights, self.n_ce)
        if self.form == "ia3":
            scales = self._aggregate(aux_index, aux_weights)
            out = self._run(hidden_states, main_index, main_weights, self.gate_up_proj, self.down_proj, scales)
            return out.to(hidden_states.dtype)
        if self.form == "subset" and torch.is_grad_enabled() and (
                self.gate_up_proj.requires_grad or self.down_proj.requires_grad):
            # Training the expert weights: gradients through slices of them would cost a zeroed
            # weight-sized buffer per slice and step, so the auxiliary rows run the whole expert
            # with the neurons past r masked out instead: the same output and gradients.
            index = torch.cat([main_index, aux_index], dim=-1)
            weights = torch.cat([main_weights, aux_weights], dim=-1)
            out = self._run(hidden_states, index, weights, self.gate_up_proj, self.down_proj,
                            neuron_limit=(main_index.shape[-1], self.r))
            return out.to(hidden_states.dtype)
        out = self._run(hidden_states, main_index, main_weights, self.gate_up_proj, self.down_proj)
        if self.form == "subset":
            gate, up, down = self.subset_weights()
            out = out + self._run(hidden_states, aux_index, aux_weights, (gate, up), down)
        elif self.form == "slim":
            out = out + self._run(hidden_states, aux_index, aux_weights, self.ce_gate_up_proj, self.ce_down_proj)
        return out.to(hidden_states.dtype)  # main and auxiliary parts summed wide, rounded once

    def full(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The full top-k output, every routed expert run in full: what the compressed experts stand in for."""
        return self._run(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj).to(hidden_states.dtype)

    def _aggregate(
        self, aux_index: torch.Tensor, aux_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token gate/up/down scales: the auxiliary compressed experts averaged by routing weight.

        The renormalised weights are scattered into a ``[T, E]`` matrix and multiplied with the
        vectors: fewer, larger operations than gathering ``n_ce`` vectors per token.
        """
        # In float32 whatever the router's dtype. The tiny shift keeps the renormalisation finite
        # for a token whose auxiliary weights are all zero (it then averages them uniformly) and
        # changes nothing measurable otherwise.
        mix = aux_weights.new_zeros(aux_weights.shape[0], self.num_experts, dtype=torch.float32)
        mix.scatter_add_(1, aux_index, aux_weights.float() + 1e-30)
        mix = mix / mix.sum(dim=-1, keepdim=True)
        mix = mix.to(self.ce_gate.dtype)
        # Three products rather than one over a concatenation: the copy costs more than the calls.
        return mix @ self.ce_gate, mix @ self.ce_up, mix @ self.ce_down

    def _run(
        self,
        hidden_states: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        down: torch.Tensor,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        neuron_limit: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``sum_i w_i Down_i(act(Gate_i(x*g)) * Up_i(x*u) * d)`` over the given experts, all experts at once.

        ``gate_up`` is a fused ``[E, 2n, H]`` weight (one matmul) or a (gate, up) pair of
        ``[E, n, H]`` views; ``down`` is ``[E, H, n]``; ``scales`` are the ``ia3`` form's;
        ``neuron_limit = (slot, r)`` keeps only the first ``r`` neurons of rows from routing
        slots ``slot`` onward (``subset`` in training). The
        result is left at the routing weights' precision (float32 for some routers), for the
        caller to sum and round once.
        """
        groups = Grouping.build(index, self.num_experts)
        if down.dtype != hidden_states.dtype:  # slim's float32 master copies under --precision bf16
            gate_up = tuple(w.to(hidden_states.dtype) for w in gate_up) if isinstance(gate_up, tuple) else gate_up.to(
                hidden_states.dtype)
            down = down.to(hidden_states.dtype)
        if scales is not None:
            scale_gate, scale_up, scale_down = (s.to(hidden_states.dtype) for s in scales)
            # Scale once per token ([T, H]), then gather the (token, expert) rows: the scaling costs a
            # pass over T rows rather than over T * m.
            gate, up = split_gate_up(
                (hidden_states * scale_gate)[groups.token], (hidden_states * scale_up)[groups.token],
                gate_up, groups.offsets, self.path,
            )
            inner = self.act_fn(gate) * up * scale_down[groups.token]
        else:
            rows = hidden_states[groups.token]
            if isinstance(gate_up, tuple):
                gate, up = (grouped_linear(rows, w, groups.offsets, self.path) for w in gate_up)
            else:
                gate, up = grouped_linear(rows, gate_up, groups.offsets, self.path).chunk(2, dim=-1)
            inner = self.act_fn(gate) * up
        if neuron_limit is not None:
            slot, r = neuron_limit
            cut = (groups.order % groups.slots >= slot).unsqueeze(-1) & (
                torch.arange(inner.shape[-1], device=inner.device) >= r)
            inner = inner.masked_fill(cut, 0)
        out = grouped_linear(inner, down, groups.offsets, self.path)
        # Weight and sum at the routing weights' precision (float32 for some routers), round once.
        wide = torch.promote_types(out.dtype, weights.dtype)
        out = out.to(wide) * weights.reshape(-1)[groups.order].unsqueeze(-1).to(wide)
        return groups.combine(out, hidden_states.shape[0])


#: What the decode kernels compute in (accumulating in float32): float64 would lose precision there.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _is_silu(act: nn.Module) -> bool:
    """transformers' "silu" is its own SiLUActivation class in some versions, torch's nn.SiLU in others."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def split_routing(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_ce: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(main index, main weights, auxiliary index, auxiliary weights): each token's experts by
    weight, the ``n_ce`` lightest auxiliary. Routers do not all return their experts sorted
    (PhiMoE's sparsemixer and DeepSeek's grouped routing do not); ties keep the router's order."""
    weights, order = top_k_weights.sort(dim=-1, descending=True, stable=True)
    index = top_k_index.gather(-1, order)
    main = top_k_index.shape[-1] - n_ce
    return index[:, :main], weights[:, :main], index[:, main:], weights[:, main:]


def set_compute_path(model: nn.Module, path: str) -> None:
    """Force how every compressed-experts block of ``model`` multiplies its experts.

    ``"auto"`` (the default) picks per call: ``grouped_mm`` where the build and device take the
    operands, except decode-sized calls, which loop over the experts that have rows on CPU (rows
    at most a quarter of the experts) and run the fused Triton kernels on CUDA (inference,
    ``ia3``/``none`` forms, rows at most twice the experts).
    ``"grouped"`` always uses ``grouped_mm`` and ``"decode"`` always the kernels (errors where they
    cannot run); ``"loop"`` always loops.
    """
    if path not in PATHS:
        raise CompressedExpertsError(f"unknown compute path {path!r}; choose from {', '.join(PATHS)}")
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if not layers:
        raise CompressedExpertsError("this model has no compressed-experts blocks: convert it first")
    for layer in layers:
        layer.path = path
