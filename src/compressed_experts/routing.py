"""What one call of a compressed-experts block hands around: its routing, split into main and
auxiliary experts, and the expert runs that a form asks a backend to compute.

Forms (what stands in for the auxiliary experts) and backends (how the expert products are
computed) both speak in these terms and know nothing of each other.

Which of a token's routed experts are main is decided by a rule: a fixed number ``n_ce`` of
auxiliary experts (the lightest), or a per-token rule, ``top_p`` or ``skip_below``
(:func:`main_slots`), under which the number of main experts varies from token to token, or
``kept_experts``, the rule of a model pruned with stand-ins (:func:`compressed_experts.prune`):
the experts whose ids are below it run in full, the others were removed and their compressed
experts stand in for them (so a token may have no main expert at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .errors import CompressedExpertsError

#: The settings that choose a token's main experts; exactly one of them is given.
RULES = ("n_ce", "top_p", "skip_below", "kept_experts")


class Ruled:
    """What the rule settings (:data:`RULES`) of a config, a block or a call mean (a mixin: the
    class holds them as attributes)."""

    @property
    def dynamic(self) -> bool:
        """Whether the number of main experts varies per token (``top_p``, ``skip_below`` or ``kept_experts``)."""
        return self.top_p is not None or self.skip_below is not None or self.kept_experts is not None

    @property
    def stand_in_offset(self) -> int:
        """The first expert id that has compressed experts of its own: ``kept_experts`` (only the removed
        experts have them, numbered from 0), else 0 (every expert has them)."""
        return self.kept_experts or 0

    @property
    def compresses(self) -> bool:
        """Whether any token may have auxiliary experts (False: the full top-k block, ``n_ce = 0``)."""
        return self.dynamic or bool(self.n_ce)


def rule_of(settings: Any) -> dict[str, Any]:
    """The rule settings that ``settings`` (a config, a block, a training run's settings, which have no
    ``kept_experts``: only pruning sets it) holds, by name: those not None."""
    return {name: getattr(settings, name) for name in RULES if getattr(settings, name, None) is not None}


def check_rule(n_ce: Any, top_p: Any, skip_below: Any, kept_experts: Any = None) -> None:
    """Refuse anything but exactly one rule, with its value in range (``n_ce`` against a model's
    top-k and ``kept_experts`` against its expert count are checked later, where they are known)."""
    given = [name for name, value in zip(RULES, (n_ce, top_p, skip_below, kept_experts)) if value is not None]
    if len(given) != 1:
        raise CompressedExpertsError(
            f"give exactly one of n_ce (a fixed number of auxiliary experts per token), top_p or skip_below "
            f"(a per-token rule); got {' and '.join(given) if given else 'none'}",
            settings=RULES,
        )
    if kept_experts is not None:
        if isinstance(kept_experts, bool) or not isinstance(kept_experts, int) or kept_experts < 1:
            raise CompressedExpertsError(
                f"kept_experts must be a whole number of experts, 1 or more; got {kept_experts!r}",
                settings=("kept_experts",),
            )
        return
    if n_ce is not None:
        if isinstance(n_ce, bool) or not isinstance(n_ce, int):
            raise CompressedExpertsError(f"n_ce must be a whole number, got {n_ce!r}", settings=("n_ce",))
        if n_ce < 0:
            raise CompressedExpertsError(f"n_ce must be 0 or more, got {n_ce}", settings=("n_ce",))
        return
    name, value = given[0], top_p if top_p is not None else skip_below
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if name == "top_p" and not (number and 0 < value <= 1):
        raise CompressedExpertsError(
            f"top_p is the share of each token's routing weight that its main experts cover: a number in "
            f"(0, 1], e.g. 0.6; got {value!r}",
            settings=("top_p",),
        )
    if name == "skip_below" and not (number and 0 < value < 1):
        raise CompressedExpertsError(
            f"skip_below is a fraction of each token's top routing weight (experts below it are auxiliary): "
            f"a number in (0, 1), e.g. 0.3; got {value!r}",
            settings=("skip_below",),
        )


def main_slots(sorted_weights: torch.Tensor, top_p: float | None, skip_below: float | None) -> torch.Tensor:
    """``[T, k]`` bool, True where a slot is main under a per-token rule; ``sorted_weights`` is each
    token's routing weights as the router gave them, heaviest first.

    ``top_p``: the fewest heaviest slots whose weights add up to ``top_p`` of the token's routed
    weight (the sum of its k weights), so a slot is main when the slots before it hold less than
    that. ``skip_below``: the slots whose weight is at least ``skip_below`` times the token's top
    weight. Either way the heaviest slot is always main (at least one, at most k). Computed in
    float32 with fixed shapes: no host sync.
    """
    weights = sorted_weights.float()
    first = torch.zeros_like(weights, dtype=torch.bool)
    first[:, 0] = True
    if top_p is not None:
        held = weights.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(held[:, :1]), held[:, :-1]], dim=-1)  # weight of the heavier slots
        return first | (before < top_p * held[:, -1:])
    return first | (weights >= skip_below * weights[:, :1])


class Split(NamedTuple):
    """Each token's routed experts ordered by weight, the first ``m`` main, the rest auxiliary.

    Under a per-token rule the halves keep fixed shapes: ``main_index`` holds all ``k`` slots and
    ``aux_index`` slots 2..k (the heaviest is always main; under ``kept_experts`` all k slots, as
    any may be a removed expert), and ``main_skip`` / ``aux_skip`` mark the pairs that are not
    main / not auxiliary for their token (pairs not to compute). With a fixed ``n_ce`` both are
    None. ``aux_index`` numbers the experts as their compressed experts are numbered: under
    ``kept_experts`` from the first removed one (``id - kept_experts``; a skipped pair's is 0).
    """

    main_index: torch.Tensor  # [T, m]
    main_weights: torch.Tensor  # [T, m], as the router gave them (not renormalised)
    aux_index: torch.Tensor  # [T, n_ce]
    aux_weights: torch.Tensor  # [T, n_ce]
    main_skip: torch.Tensor | None = None  # [T, k], per-token rules only
    aux_skip: torch.Tensor | None = None  # [T, k - 1], per-token rules only


def split_routing(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    n_ce: int | None,
    top_p: float | None = None,
    skip_below: float | None = None,
    kept_experts: int | None = None,
) -> Split:
    """Each token's experts by weight, the ``n_ce`` lightest auxiliary, or under a per-token rule
    (``top_p``, ``skip_below``: see :func:`main_slots`) as many as the rule makes auxiliary, or
    under ``kept_experts`` those whose ids are not below it. Routers do not all return their
    experts sorted (PhiMoE's sparsemixer and DeepSeek's grouped routing do not); ties keep the
    router's order, so every backend makes the same split."""
    weights, order = top_k_weights.sort(dim=-1, descending=True, stable=True)
    index = top_k_index.gather(-1, order)
    if kept_experts is not None:
        kept = index < kept_experts
        return Split(index, weights, (index - kept_experts).clamp_min(0), weights, ~kept, kept)
    if top_p is None and skip_below is None:
        if n_ce is None:
            raise CompressedExpertsError("split_routing needs n_ce, top_p or skip_below", settings=RULES)
        main = top_k_index.shape[-1] - n_ce
        return Split(index[:, :main], weights[:, :main], index[:, main:], weights[:, main:])
    is_main = main_slots(weights, top_p, skip_below)
    return Split(index, weights, index[:, 1:], weights[:, 1:], ~is_main, is_main[:, 1:])


@dataclass(frozen=True)
class ExpertRun:
    """``sum_i w_i Down_i(act(Gate_i(x*g)) * Up_i(x*u) * d)`` over the (token, expert) pairs of ``index``.

    ``gate_up`` is a fused ``[E, 2n, H]`` weight (gate rows first) or a (gate, up) pair of
    ``[E, n, H]`` views; ``down`` is ``[E, H, n]``. ``scales`` are per-token ``(g [T, H], u [T, H],
    d [T, n])``, absent for plain experts. ``neuron_limit = (slot, r)`` keeps only the first ``r``
    neurons of the pairs in routing slots ``slot`` onward. ``skip`` ``[T, s]`` marks pairs not to
    compute (they add exactly nothing, and take no gradient): a per-token rule's other half.
    """

    index: torch.Tensor  # [T, s]
    weights: torch.Tensor  # [T, s]
    gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    down: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    neuron_limit: tuple[int, int] | None = None
    skip: torch.Tensor | None = None

    @property
    def experts(self) -> int:
        """Experts this run's weights hold (its ids run from 0 to this, less one)."""
        return self.down.shape[0]

    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every expert weight this run multiplies by, as ``[E, out, in]``."""
        gate_up = self.gate_up if isinstance(self.gate_up, tuple) else (self.gate_up,)
        return (*gate_up, self.down)


@dataclass
class Call(Ruled):
    """One call of a compressed-experts block: its inputs, its rule, and (computed once, on demand)
    the runs its form asks for. ``n_ce = 0`` is the full top-k block, whatever the form; ``top_p``,
    ``skip_below`` or ``kept_experts`` (with ``n_ce`` None) a per-token rule."""

    layer: Any  # the CompressedExperts module (typed loosely: this module sits below it)
    x: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    n_ce: int | None
    top_p: float | None = None
    skip_below: float | None = None
    kept_experts: int | None = None
    _runs: list[ExpertRun] | None = field(default=None, repr=False)

    @property
    def main_rows(self) -> int:
        """(token, main expert) pairs the products are sized for: the size that decides which backend is
        fastest (under a per-token rule every slot has a row, those of auxiliary pairs skipped)."""
        tokens, slots = self.top_k_index.shape
        return tokens * (slots if self.dynamic else slots - self.n_ce)

    def split(self) -> Split:
        """The routing split by this call's rule."""
        return split_routing(
            self.top_k_index, self.top_k_weights, self.n_ce, self.top_p, self.skip_below, self.kept_experts
        )

    @property
    def runs(self) -> list[ExpertRun]:
        if self._runs is None:
            layer = self.layer
            if not self.compresses:
                self._runs = [ExpertRun(self.top_k_index, self.top_k_weights, layer.gate_up_proj, layer.down_proj)]
            else:
                self._runs = layer.form_spec.runs(layer, self.split())
        return self._runs
