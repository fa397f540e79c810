"""``eager``: the method token by token, in float64. The readable reference, and the tests' oracle.

For each token: order its routed experts by weight (ties keep the router's order), keep the
first ``m = k - n_ce`` as main experts and hand the rest to the form, which says what they
contribute (:meth:`~compressed_experts.forms.base.Form.token_output`). Nothing is batched,
grouped or fused; it is slow, and it is differentiable.
"""

from __future__ import annotations

import torch

from ..routing import Call
from .base import Backend


class Eager(Backend):
    name = "eager"

    def run(self, call: Call) -> torch.Tensor:
        layer, form = call.layer, call.layer.form_spec
        x = call.x.double()
        rows = []
        for t in range(x.shape[0]):
            experts, weights = call.top_k_index[t].tolist(), call.top_k_weights[t].double()
            order = sorted(range(len(experts)), key=lambda j: -weights[j].item())  # sorted() is stable
            slots = [(experts[j], weights[j]) for j in order]
            main, aux = slots[: len(slots) - call.n_ce], slots[len(slots) - call.n_ce :]
            rows.append(form.token_output(layer, x[t], main, aux))
        out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[-1])
        return out.to(call.x.dtype)
