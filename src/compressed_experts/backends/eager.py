"""``eager``: the method token by token, in float64. The readable reference, and the tests' oracle.

For each token: order its routed experts by weight (ties keep the router's order), keep the
first ``m = k - n_ce`` as main experts (under a per-token rule, as many as
:func:`~compressed_experts.routing.main_slots` says; under ``kept_experts`` those below it) and
hand the rest to the form, which says
what they contribute (:meth:`~compressed_experts.forms.base.Form.token_output`). Nothing is
batched, grouped or fused; it is slow, and it is differentiable.
"""

from __future__ import annotations

import torch

from ..routing import Call, main_slots
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
            if call.kept_experts is not None:  # kept experts in full; a removed one's stand-ins are numbered from 0
                kept = call.kept_experts
                main = [(e, w) for e, w in slots if e < kept]
                out = form.token_output(layer, x[t], main, [(e - kept, w) for e, w in slots if e >= kept])
                rows.append(x.new_zeros(x.shape[-1]) + out)  # a token with no main expert under ia3 or none: 0
                continue
            if call.dynamic:  # the rule, on the weights as the router gave them
                main = int(main_slots(call.top_k_weights[t, order][None], call.top_p, call.skip_below).sum())
            else:
                main = len(slots) - call.n_ce
            rows.append(form.token_output(layer, x[t], slots[:main], slots[main:]))
        out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[-1])
        return out.to(call.x.dtype)
