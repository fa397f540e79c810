"""Which intermediate neurons of each expert matter most: the selection behind the subset and slim forms.

An expert's intermediate neurons can be listed in any order without changing what it computes,
as long as its gate and up rows and the matching down-projection column move together.
Selection reorders every expert's neurons so that the most important come first; the
``subset`` form then runs a view of the first ``r`` (no copy, no index tensor in the forward
pass) and the ``slim`` form starts as a copy of them.
"""

from __future__ import annotations

import torch

from .backends.products import Grouping, grouped_linear, grouped_mm_takes
from .layer import CompressedExperts
from .routing import split_routing


def weight_importance(layer: CompressedExperts) -> torch.Tensor:
    """A data-free estimate ``[E, I]``: the product of a neuron's gate-row, up-row and down-column norms.

    It bounds how large the neuron's contribution can get for an input of unit norm; the
    calibration estimate (:class:`ActivationImportance`) measures what it actually is.
    """
    gate, up = layer.gate_up_proj.detach().float().chunk(2, dim=1)
    return gate.norm(dim=-1) * up.norm(dim=-1) * layer.down_proj.detach().float().norm(dim=1)


class ActivationImportance:
    """Calibration estimate of each neuron's importance when its expert is auxiliary.

    Sums, over the (token, expert) pairs where the expert is one of the token's auxiliary experts
    (its ``n_ce`` lowest-weighted, or those its per-token rule leaves out), the routing weight
    times the neuron's activation magnitude ``|act(gate) * up|``; times the norm of its
    down-projection column this is the size of
    what the neuron adds to the output. Experts that calibration never made auxiliary keep
    the weight-based estimate.
    """

    def __init__(self, layer: CompressedExperts) -> None:
        self.layer = layer
        self.sums = torch.zeros(layer.num_experts, layer.intermediate_dim, dtype=torch.float32)
        self.rows = torch.zeros(layer.num_experts, dtype=torch.long)

    @torch.no_grad()
    def update(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Add one batch of a block's expert inputs (as the block hands them to its experts)."""
        layer = self.layer
        split = split_routing(top_k_index, top_k_weights, layer.n_ce, layer.top_p, layer.skip_below, layer.kept_experts)
        index, weights = (
            split.aux_index + layer.stand_in_offset,
            split.aux_weights,
        )  # expert ids, as the weights hold them
        auxiliary = torch.ones_like(index, dtype=torch.bool) if split.aux_skip is None else ~split.aux_skip
        weights = weights * auxiliary  # a slot its token keeps as main adds nothing
        groups = Grouping.build(index, layer.num_experts)
        rows = hidden_states[groups.token]
        grouped = layer.path != "loop" and grouped_mm_takes(rows, layer.gate_up_proj.transpose(-2, -1))
        gate, up = grouped_linear(rows, layer.gate_up_proj, groups.offsets, grouped).chunk(2, -1)
        magnitude = (layer.act_fn(gate) * up).abs().float() * weights.reshape(-1)[groups.order].float().unsqueeze(-1)
        experts = index.reshape(-1)[groups.order].cpu()
        self.sums.index_add_(0, experts, magnitude.cpu())
        counted = auxiliary.reshape(-1)[groups.order].cpu().float()
        self.rows += torch.bincount(experts, weights=counted, minlength=layer.num_experts).long()

    def result(self) -> torch.Tensor:
        """The ``[E, I]`` importance to hand to :func:`select_neurons`."""
        measured = self.sums * self.layer.down_proj.detach().float().norm(dim=1).cpu()
        seen = (self.rows > 0).unsqueeze(-1)
        return torch.where(seen, measured, weight_importance(self.layer).cpu())


@torch.no_grad()
def select_neurons(layer: CompressedExperts, importance: torch.Tensor) -> None:
    """Reorder each expert's neurons by ``importance`` ``[E, I]`` (highest first), in place.

    The full experts compute exactly what they did (the main experts are unchanged); the
    ``subset`` form's first ``r`` neurons become the most important ones, and the form is told
    (the ``slim`` form resets its MLPs to a copy of them).
    """
    order = importance.to(layer.gate_up_proj.device).argsort(dim=1, descending=True, stable=True)  # [E, I]
    hidden = layer.hidden_dim
    rows = order.unsqueeze(-1).expand(-1, -1, hidden)
    gate, up = layer.gate_up_proj.chunk(2, dim=1)
    layer.gate_up_proj.copy_(torch.cat([gate.gather(1, rows), up.gather(1, rows)], dim=1))
    layer.down_proj.copy_(layer.down_proj.gather(2, order.unsqueeze(1).expand(-1, hidden, -1)))
    layer.form_spec.neurons_reordered(layer)
