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

from .dispatch import PATHS, Grouping, grouped_linear, split_gate_up
from .errors import CompressedExpertsError


class CompressedExperts(nn.Module):
    """Run the ``m = k - n_ce`` heaviest routed experts in full, modulated by compressed experts.

    Parameters are the original expert weights (shared, not copied) plus, for the ``ia3``
    form, three vectors per expert, ``ce_gate`` ``[E, H]``, ``ce_up`` ``[E, H]`` and
    ``ce_down`` ``[E, I]``, which start at 1.0 so that a fresh conversion only changes how
    many full experts run. The ``none`` form has no vectors: it is the top-m baseline.
    """

    def __init__(self, experts: nn.Module, n_ce: int, form: str = "ia3") -> None:
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj  # [E, 2I, H], gate rows first
        self.down_proj = experts.down_proj  # [E, H, I]
        self.act_fn = experts.act_fn
        self.num_experts, two_i, self.hidden_dim = self.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.n_ce = n_ce
        self.form = form
        self.path = "auto"  # compute path of the expert matmuls, see set_compute_path
        if form == "none":
            return
        like = dict(dtype=self.gate_up_proj.dtype, device=self.gate_up_proj.device)
        self.ce_gate = nn.Parameter(torch.ones(self.num_experts, self.hidden_dim, **like))
        self.ce_up = nn.Parameter(torch.ones(self.num_experts, self.hidden_dim, **like))
        self.ce_down = nn.Parameter(torch.ones(self.num_experts, self.intermediate_dim, **like))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, n_ce={self.n_ce}, form={self.form}, path={self.path}"
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.n_ce == 0:
            return self._run_main(hidden_states, top_k_index, top_k_weights, None)
        main = top_k_index.shape[-1] - self.n_ce
        # Routers do not all return their experts sorted (sparsemixer, grouped routing do not).
        weights, order = top_k_weights.sort(dim=-1, descending=True, stable=True)
        index = top_k_index.gather(-1, order)
        scales = None if self.form == "none" else self._aggregate(index[:, main:], weights[:, main:])
        return self._run_main(hidden_states, index[:, :main], weights[:, :main], scales)

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

    def _run_main(
        self,
        hidden_states: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``sum_i w_i Down_i(act(Gate_i(x*g)) * Up_i(x*u) * d)`` over the given experts, all experts at once."""
        groups = Grouping.build(index, self.num_experts)
        if scales is None:
            rows = hidden_states[groups.token]
            gate, up = grouped_linear(rows, self.gate_up_proj, groups.offsets, self.path).split(
                self.intermediate_dim, dim=-1
            )
            inner = self.act_fn(gate) * up
        else:
            scale_gate, scale_up, scale_down = (s.to(hidden_states.dtype) for s in scales)
            # Scale once per token ([T, H]), then gather the (token, expert) rows: the scaling costs a
            # pass over T rows rather than over T * m.
            gate, up = split_gate_up(
                (hidden_states * scale_gate)[groups.token], (hidden_states * scale_up)[groups.token],
                self.gate_up_proj, groups.offsets, self.path,
            )
            inner = self.act_fn(gate) * up * scale_down[groups.token]
        out = grouped_linear(inner, self.down_proj, groups.offsets, self.path)
        # Weight and sum at the routing weights' precision (float32 for some routers), round once.
        wide = torch.promote_types(out.dtype, weights.dtype)
        out = out.to(wide) * weights.reshape(-1)[groups.order].unsqueeze(-1).to(wide)
        return groups.combine(out, hidden_states.shape[0]).to(hidden_states.dtype)


def set_compute_path(model: nn.Module, path: str) -> None:
    """Force how every compressed-experts block of ``model`` multiplies its experts.

    ``"auto"`` (the default) picks per call: ``grouped_mm`` where the build and device take the
    operands, except decode-sized calls on CPU, which loop over the experts that have rows.
    ``"grouped"`` always uses ``grouped_mm`` (an error where it cannot); ``"loop"`` always loops.
    """
    if path not in PATHS:
        raise CompressedExpertsError(f"unknown compute path {path!r}; choose from {', '.join(PATHS)}")
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if not layers:
        raise CompressedExpertsError("this model has no compressed-experts blocks: convert it first")
    for layer in layers:
        layer.path = path
