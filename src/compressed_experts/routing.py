"""What one call of a compressed-experts block hands around: its routing, split into main and
auxiliary experts, and the expert runs that a form asks a backend to compute.

Forms (what stands in for the auxiliary experts) and backends (how the expert products are
computed) both speak in these terms and know nothing of each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class Split(NamedTuple):
    """Each token's routed experts ordered by weight, the first ``m`` main, the rest auxiliary
    (a tuple, so ``main_index, main_weights, aux_index, aux_weights = split_routing(...)`` works)."""

    main_index: torch.Tensor  # [T, m]
    main_weights: torch.Tensor  # [T, m], as the router gave them (not renormalised)
    aux_index: torch.Tensor  # [T, n_ce]
    aux_weights: torch.Tensor  # [T, n_ce]


def split_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_ce: int) -> Split:
    """Each token's experts by weight, the ``n_ce`` lightest auxiliary. Routers do not all return
    their experts sorted (PhiMoE's sparsemixer and DeepSeek's grouped routing do not); ties keep
    the router's order, so every backend makes the same split."""
    weights, order = top_k_weights.sort(dim=-1, descending=True, stable=True)
    index = top_k_index.gather(-1, order)
    main = top_k_index.shape[-1] - n_ce
    return Split(index[:, :main], weights[:, :main], index[:, main:], weights[:, main:])


@dataclass(frozen=True)
class ExpertRun:
    """``sum_i w_i Down_i(act(Gate_i(x*g)) * Up_i(x*u) * d)`` over the (token, expert) pairs of ``index``.

    ``gate_up`` is a fused ``[E, 2n, H]`` weight (gate rows first) or a (gate, up) pair of
    ``[E, n, H]`` views; ``down`` is ``[E, H, n]``. ``scales`` are per-token ``(g [T, H], u [T, H],
    d [T, n])``, absent for plain experts. ``neuron_limit = (slot, r)`` keeps only the first ``r``
    neurons of the pairs in routing slots ``slot`` onward.
    """

    index: torch.Tensor  # [T, s]
    weights: torch.Tensor  # [T, s]
    gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    down: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    neuron_limit: tuple[int, int] | None = None

    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every expert weight this run multiplies by, as ``[E, out, in]``."""
        gate_up = self.gate_up if isinstance(self.gate_up, tuple) else (self.gate_up,)
        return (*gate_up, self.down)


@dataclass
class Call:
    """One call of a compressed-experts block: its inputs, and (computed once, on demand) the runs
    its form asks for. ``n_ce = 0`` is the full top-k block, whatever the form."""

    layer: Any  # the CompressedExperts module (typed loosely: this module sits below it)
    x: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    n_ce: int
    _runs: list[ExpertRun] | None = field(default=None, repr=False)

    @property
    def main_rows(self) -> int:
        """(token, main expert) pairs: the size that decides which backend is fastest."""
        return self.top_k_index.shape[0] * (self.top_k_index.shape[1] - self.n_ce)

    @property
    def runs(self) -> list[ExpertRun]:
        if self._runs is None:
            layer = self.layer
            if self.n_ce == 0:
                self._runs = [ExpertRun(self.top_k_index, self.top_k_weights, layer.gate_up_proj, layer.down_proj)]
            else:
                split = split_routing(self.top_k_index, self.top_k_weights, self.n_ce)
                self._runs = layer.form_spec.runs(layer, split)
        return self._runs
