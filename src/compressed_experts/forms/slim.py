"""``slim``: each auxiliary expert is replaced by a small gated MLP of its own with ``r`` neurons.

Per expert ``ce_gate_up_proj`` ``[E, 2r, H]`` and ``ce_down_proj`` ``[E, H, r]``, a copy of the
expert's ``r`` most important neurons to start with (so it starts as the ``subset`` form), then
trainable. An auxiliary expert's output is weighted by its routing weight and added.
"""

from __future__ import annotations

import torch

from ..routing import ExpertRun, Split
from .base import Form, expert, main_run, weighted_sum
from .subset import first_neurons


class Slim(Form):
    name = "slim"
    rank = 3
    help = "a small trainable MLP of r neurons per expert, a copy of its most important neurons to start with"
    takes_r = True
    parameters = ("ce_gate_up_proj", "ce_down_proj")
    backends = ("eager", "grouped", "loop", "fused")
    selects_neurons = True
    fit_lr = 1e-3

    def initial_parameters(self, layer) -> dict[str, torch.Tensor]:
        # Under kept_experts only the removed experts (from the offset on) get an MLP.
        gate, up, down = (part[layer.stand_in_offset :] for part in first_neurons(layer))
        return {"ce_gate_up_proj": torch.cat([gate, up], dim=1).detach().clone(), "ce_down_proj": down.detach().clone()}

    def runs(self, layer, split: Split) -> list[ExpertRun]:
        return [
            main_run(layer, split),
            ExpertRun(
                split.aux_index, split.aux_weights, layer.ce_gate_up_proj, layer.ce_down_proj, skip=split.aux_skip
            ),
        ]

    def token_output(self, layer, x, main, aux):
        r = layer.r

        def small(e: int) -> torch.Tensor:
            gate_up, down = layer.ce_gate_up_proj[e].to(x.dtype), layer.ce_down_proj[e].to(x.dtype)
            return down @ (layer.act_fn(gate_up[:r] @ x) * (gate_up[r:] @ x))

        return weighted_sum(main, lambda e: expert(layer, e, x)) + weighted_sum(aux, small)

    def auxiliary_cost(self, layer) -> int:
        return 3 * layer.hidden_dim * layer.r

    @torch.no_grad()
    def neurons_reordered(self, layer) -> None:
        """Start again from a copy of the (newly chosen) first ``r`` neurons."""
        for name, value in self.initial_parameters(layer).items():
            getattr(layer, name).copy_(value)
