"""``ia3``, the paper's form: three vectors per expert that scale the main experts' projections.

Every expert ``j`` owns ``g_j`` (scales the gate projection's input, size H), ``u_j`` (the up
projection's input, H) and ``d_j`` (the down projection's input, I). A token averages its
auxiliary experts' vectors with their routing weights renormalised to sum to one, and its main
experts run on the scaled inputs, weighted by the router's weights as they are (not
renormalised). The vectors start at 1.0, so a fresh conversion is top-m routing.
"""

from __future__ import annotations

import torch

from ..routing import ExpertRun, Split
from .base import Form, expert, main_run, weighted_sum


class IA3(Form):
    name = "ia3"
    rank = 0
    help = "the paper's vectors: three per expert, averaged over the token's auxiliary experts, that scale its main experts"
    parameters = ("ce_gate", "ce_up", "ce_down")
    fit_lr = 1e-2
    backends = ("eager", "grouped", "loop", "decode", "fused")

    def initial_parameters(self, layer) -> dict[str, torch.Tensor]:
        like = dict(dtype=layer.gate_up_proj.dtype, device=layer.gate_up_proj.device)
        sizes = {"ce_gate": layer.hidden_dim, "ce_up": layer.hidden_dim, "ce_down": layer.intermediate_dim}
        experts = layer.num_experts - layer.stand_in_offset  # under kept_experts only the removed ones have them
        return {name: torch.ones(experts, size, **like) for name, size in sizes.items()}

    def runs(self, layer, split: Split) -> list[ExpertRun]:
        return [main_run(layer, split, scales=self.averaged(layer, split.aux_index, split.aux_weights, split.aux_skip))]

    @staticmethod
    def averaged(
        layer, aux_index: torch.Tensor, aux_weights: torch.Tensor, aux_skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Per-token ``(g, u, d)``: the auxiliary vectors averaged by renormalised routing weight.

        The weights are scattered into a ``[T, E]`` matrix and multiplied with the vectors: fewer,
        larger operations than gathering ``n_ce`` vectors per token. In float32 whatever the
        router's dtype; the tiny shift keeps the renormalisation finite for a token whose
        auxiliary weights are all zero (it then averages them uniformly). Pairs in ``aux_skip``
        (main under a per-token rule) take no part; a token left with no auxiliary expert gets
        scales of exactly 1 (it runs full top-k).
        """
        shifted = aux_weights.float() + 1e-30
        if aux_skip is not None:
            shifted = shifted.masked_fill(aux_skip, 0.0)
        mix = aux_weights.new_zeros(aux_weights.shape[0], layer.ce_gate.shape[0], dtype=torch.float32)
        mix.scatter_add_(1, aux_index, shifted)
        total = mix.sum(dim=-1, keepdim=True)
        if aux_skip is None:
            mix = (mix / total).to(layer.ce_gate.dtype)
            # Three products rather than one over a concatenation: the copy costs more than the calls.
            return mix @ layer.ce_gate, mix @ layer.ce_up, mix @ layer.ce_down
        alone = total == 0  # no auxiliary expert: its row of mix is zeros, and 0 + 1 is exactly 1
        mix = (mix / total.masked_fill(alone, 1.0)).to(layer.ce_gate.dtype)
        return tuple(mix @ vectors + alone.to(mix.dtype) for vectors in (layer.ce_gate, layer.ce_up, layer.ce_down))

    def token_output(self, layer, x, main, aux):
        if not aux:  # the full block (n_ce = 0, or a token a per-token rule keeps whole): nothing scales
            return weighted_sum(main, lambda e: expert(layer, e, x))
        total = sum(w + 1e-30 for _, w in aux)
        scales = tuple(
            sum((w + 1e-30) / total * vectors[e].to(x.dtype) for e, w in aux)
            for vectors in (layer.ce_gate, layer.ce_up, layer.ce_down)
        )
        return weighted_sum(main, lambda e: expert(layer, e, x, scales=scales))

    def auxiliary_cost(self, layer) -> int:
        return 2 * layer.hidden_dim + layer.intermediate_dim

    def kernel_vectors(self, layer):
        return layer.ce_gate, layer.ce_up, layer.ce_down
