"""``subset``: an auxiliary expert runs only its ``r`` most important intermediate neurons.

No parameters are added. :func:`compressed_experts.neurons.select_neurons` reorders each
expert's neurons (which leaves the full expert's function unchanged) so that the first ``r``
are the important ones; the form then runs a view of them. An auxiliary expert's output is
weighted by its routing weight and added like a main expert's, so ``r = I`` is full top-k.
"""

from __future__ import annotations

import torch

from ..routing import ExpertRun, Split
from .base import Form, expert, main_run, weighted_sum


def first_neurons(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of every expert's first ``r`` neurons: gate ``[E, r, H]``, up ``[E, r, H]``, down ``[E, H, r]``."""
    inter, r = layer.intermediate_dim, layer.r
    return layer.gate_up_proj[:, :r], layer.gate_up_proj[:, inter : inter + r], layer.down_proj[:, :, :r]


class Subset(Form):
    name = "subset"
    rank = 2
    help = "each auxiliary expert runs its own r most important neurons (no parameters added)"
    takes_r = True
    selects_neurons = True
    stands_in = False

    def runs(self, layer, split: Split) -> list[ExpertRun]:
        if torch.is_grad_enabled() and (layer.gate_up_proj.requires_grad or layer.down_proj.requires_grad):
            # Training the expert weights: gradients through slices of them would cost a zeroed
            # weight-sized buffer per slice and step, so the auxiliary pairs run the whole expert
            # with the neurons past r masked out instead: the same output and gradients.
            skip = None if split.main_skip is None else torch.cat([split.main_skip, split.aux_skip], dim=-1)
            return [
                ExpertRun(
                    torch.cat([split.main_index, split.aux_index], dim=-1),
                    torch.cat([split.main_weights, split.aux_weights], dim=-1),
                    layer.gate_up_proj,
                    layer.down_proj,
                    neuron_limit=(split.main_index.shape[-1], layer.r),
                    skip=skip,
                )
            ]
        gate, up, down = first_neurons(layer)
        return [
            main_run(layer, split),
            ExpertRun(split.aux_index, split.aux_weights, (gate, up), down, skip=split.aux_skip),
        ]

    def token_output(self, layer, x, main, aux):
        return weighted_sum(main, lambda e: expert(layer, e, x)) + weighted_sum(
            aux, lambda e: expert(layer, e, x, neurons=layer.r)
        )

    def auxiliary_cost(self, layer) -> int:
        return 3 * layer.hidden_dim * layer.r
