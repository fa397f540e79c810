"""The interface every compressed-expert form implements, and the per-token pieces forms share.

A form says what stands in for a token's auxiliary experts. It is a small stateless object:
the parameters it adds to a block and their initial values, the expert runs a call needs
(batched, for the fast backends), the same thing for one token (the readable reference, run
by the ``eager`` backend and used by the tests as the oracle), what an auxiliary expert costs
per token, and what :func:`compressed_experts.fit` optimises. Adding a form is one module in
this package that defines a subclass with a ``name`` and a ``rank``: the package finds it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..routing import ExpertRun, Split

#: One (expert id, routing weight) pair of a token, as the eager backend hands them to a form.
Slot = tuple[int, torch.Tensor]


class Form:
    """Base class of the forms; the defaults describe a form that adds nothing."""

    name: ClassVar[str]
    #: Place in listings (``FORMS``, help, error messages); the lowest is the default form.
    rank: ClassVar[int]
    #: One line for users: what an auxiliary expert becomes (shown by the CLI's --form help).
    help: ClassVar[str]
    #: Whether the form takes ``r``, the intermediate neurons of an auxiliary expert.
    takes_r: ClassVar[bool] = False
    #: Names of the parameters it adds to a :class:`~compressed_experts.layer.CompressedExperts` block.
    parameters: ClassVar[tuple[str, ...]] = ()
    #: Whether :func:`compressed_experts.fit` chooses each expert's neurons by measured importance.
    selects_neurons: ClassVar[bool] = False
    #: Adam learning rate :func:`compressed_experts.fit` uses for the parameters (found on the bundled model).
    fit_lr: ClassVar[float | None] = None
    #: Whether it can stand in for experts whose weights pruning removed (``kept_experts``): not a
    #: form that runs part of the expert's own weights.
    stands_in: ClassVar[bool] = True
    #: Compute backends that can run it (the ``decode`` kernels only know the ia3 vectors and top-m).
    backends: ClassVar[tuple[str, ...]] = ("eager", "grouped", "loop")

    def initial_parameters(self, layer: Any) -> dict[str, torch.Tensor]:
        """The parameters it adds to ``layer``, with their starting values."""
        return {}

    def runs(self, layer: Any, split: Split) -> list[ExpertRun]:
        """The expert runs whose sum is the block's output (main experts included), batched."""
        raise NotImplementedError

    def token_output(self, layer: Any, x: torch.Tensor, main: list[Slot], aux: list[Slot]) -> torch.Tensor:
        """The block's output ``[H]`` for one token ``x``: ``main`` and ``aux`` are its (expert, weight)
        pairs, heaviest first. The reference that the batched :meth:`runs` must agree with."""
        raise NotImplementedError

    def auxiliary_cost(self, layer: Any) -> int:
        """Parameters one auxiliary expert touches per token (for ``active_parameters``)."""
        return 0

    def neurons_reordered(self, layer: Any) -> None:
        """Called after :func:`compressed_experts.neurons.select_neurons` reorders the experts' neurons."""

    def kernel_vectors(self, layer: Any) -> tuple[torch.Tensor, ...] | None:
        """What the ``decode`` kernels scale the main experts by (only forms that list ``decode``)."""
        return None


def main_run(layer: Any, split: Split, **kwargs: Any) -> ExpertRun:
    """The main experts of every token, in full."""
    return ExpertRun(
        split.main_index, split.main_weights, layer.gate_up_proj, layer.down_proj, skip=split.main_skip, **kwargs
    )


def expert(
    layer: Any,
    e: int,
    x: torch.Tensor,
    neurons: int | None = None,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Expert ``e`` of ``layer`` on one token, in ``x``'s dtype: ``Down(act(Gate(x*g)) * Up(x*u) * d)``,
    with only its first ``neurons`` intermediate neurons when given."""
    inter = layer.intermediate_dim
    n = inter if neurons is None else neurons
    gate = layer.gate_up_proj[e, :n].to(x.dtype)
    up = layer.gate_up_proj[e, inter : inter + n].to(x.dtype)
    down = layer.down_proj[e, :, :n].to(x.dtype)
    g, u, d = scales if scales is not None else (1, 1, 1)
    return down @ (layer.act_fn(gate @ (x * g)) * (up @ (x * u)) * d)


def weighted_sum(slots: list[Slot], contribution) -> torch.Tensor:
    """``sum_j w_j contribution(e_j)`` over the slots."""
    return sum(w * contribution(e) for e, w in slots)
