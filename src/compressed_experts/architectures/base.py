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
    #: a tiny config of this family, for tests and offline try-outs (``tiny:<family>``)
    tiny_config: Callable[[], PretrainedConfig] = field(compare=False)
    shared_attrs: tuple[str, ...] = ()  #: the block's shared-expert submodules, if any
