"""What the library needs to know about one model family, in one small record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    """Where a family keeps its MoE blocks and what else lives in them.

    Every supported family follows transformers v5's layout: the block holds a router and an
    ``experts`` module with ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, and
    its forward calls ``experts(hidden_states, top_k_index, top_k_weights)``. Only the names
    differ, and whether the block also has shared experts (run for every token).
    """

    name: str  #: shown to users, e.g. "OLMoE"
    model_types: tuple[str, ...]  #: ``config.model_type`` values of this family
    block_class: str  #: class name of its sparse MoE block
    router_attr: str  #: the block's router submodule
    shared_attrs: tuple[str, ...] = ()  #: the block's shared-expert submodules, if any
    #: a tiny config with random weights, for tests and the offline demo
    tiny_config: Callable[[], PretrainedConfig] = field(default=lambda: None, compare=False)
