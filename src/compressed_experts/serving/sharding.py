"""Tensor-parallel sharding of a compressed-experts block, as the vLLM plugin does it (pure PyTorch).

Every tensor is split along the experts' intermediate dimension ``I``, as vLLM shards its own
fused MoE: rank ``k`` of ``tp`` holds neurons ``[k*I/tp, (k+1)*I/tp)`` of every expert. The
block's output is linear in the neurons once the per-token scales are fixed, so each rank
computes a partial output over its neurons and an all-reduce sums them:

- expert weights: the gate and up rows and the down columns of the rank's neurons;
- ``ia3``: ``ce_gate`` and ``ce_up`` (size ``H``, they scale the inputs) replicated, ``ce_down``
  (size ``I``, one scale per neuron) sharded like the neurons;
- ``slim``: each auxiliary MLP's ``r`` neurons split the same way (``r`` must divide by ``tp``);
- ``subset``: the first ``r`` neurons of an expert fall into the first ranks, so a rank runs the
  part of them it holds: ``clamp(r - k*I/tp, 0, I/tp)`` of its own first neurons; a rank that holds
  none of them runs its main experts only (the ``none`` form), since it adds nothing for the
  auxiliary ones.

Which of a token's experts are main is decided on every rank from the same routing (the router's
logits and weights are replicated), so with a per-token rule (``top_p``, ``skip_below``) as with a
fixed ``n_ce`` every rank splits each token alike and the partial outputs still add up.

:func:`local_settings` gives a rank's form and ``r``; :func:`shard` cuts a full tensor into the
rank's part. ``tests/serving/test_serving_sharding.py`` checks that the ranks' partial outputs sum
to the unsharded block's, for every form, under a fixed ``n_ce`` and under each per-token rule.
"""

from __future__ import annotations

import torch

from ..errors import CompressedExpertsError
from ..forms import get_form

#: The parameter names a sharded block holds, and the (dim, halves) along which each is split:
#: ``halves=2`` for a ``[gate; up]`` stack whose two halves are split separately.
_SPLITS: dict[str, tuple[int, int] | None] = {
    "gate_up_proj": (-2, 2),  # [E, 2I, H]
    "gate_proj": (-2, 1),  # one expert's [I, H], as checkpoints hold it
    "up_proj": (-2, 1),  # [I, H]
    "down_proj": (-1, 1),  # [E, H, I]
    "ce_gate": None,  # [E, H] replicated
    "ce_up": None,  # [E, H] replicated
    "ce_down": (-1, 1),  # [E, I]
    "ce_gate_up_proj": (-2, 2),  # [E, 2r, H]
    "ce_down_proj": (-1, 1),  # [E, H, r]
}


def local_settings(form: str, r: int | None, intermediate: int, tp: int, rank: int) -> tuple[str, int | None]:
    """The form and ``r`` that rank ``rank`` of ``tp`` runs for a block of ``intermediate`` neurons per expert."""
    if intermediate % tp:
        raise CompressedExpertsError(
            f"tensor parallel size {tp} does not divide the experts' {intermediate} intermediate neurons"
        )
    if not get_form(form).takes_r:
        return form, None
    assert r is not None
    if form == "slim":
        if r % tp:
            raise CompressedExpertsError(
                f"the slim form's r={r} neurons cannot be split over tensor parallel size {tp}: use a size that divides r"
            )
        return form, r // tp
    # subset: the first r neurons of each expert, as this rank holds them
    per_rank = intermediate // tp
    held = min(max(r - rank * per_rank, 0), per_rank)
    return (form, held) if held else ("none", None)


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of the full tensor ``name`` (a view where one exists; replicated ones whole)."""
    if name not in _SPLITS:
        raise KeyError(name)
    split = _SPLITS[name]
    if split is None or tp == 1:
        return full
    dim, halves = split
    size = full.shape[dim]
    if size % (tp * halves):
        raise CompressedExpertsError(f"{name} of size {size} cannot be split over tensor parallel size {tp}")
    parts = full.chunk(halves, dim=dim)
    local = [part.chunk(tp, dim=dim)[rank] for part in parts]
    return local[0] if halves == 1 else torch.cat(local, dim=dim)
