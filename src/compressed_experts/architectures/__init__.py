"""The supported model families (one module each, found here), and how to find a model's family and MoE blocks."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

from ..errors import UnsupportedModelError
from ..plugins import modules
from .base import Family

#: Every module of this package that defines a ``FAMILY``: adding a family is one module here.
FAMILIES: tuple[Family, ...] = tuple(
    module.FAMILY for module in modules(sys.modules[__name__]) if isinstance(getattr(module, "FAMILY", None), Family)
)


def supported_families() -> str:
    """One line naming every supported family and its ``model_type``, for error messages."""
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_by_name(name: str) -> Family:
    """Look a family up by its user-facing name or model_type (case-insensitive)."""
    key = name.lower()
    for family in FAMILIES:
        if key == family.name.lower() or key in family.model_types:
            return family
    raise UnsupportedModelError(f"unknown model family {name!r}; supported: {supported_families()}")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _looks_like_moe(model: nn.Module) -> bool:
    return any(hasattr(m, "gate_up_proj") and m.gate_up_proj.dim() == 3 for m in model.modules())


def family_of(model: nn.Module) -> Family:
    """The family of a loaded transformers model, or a clear error saying why there is none."""
    model_type = _model_type(model)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if not _looks_like_moe(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) has no MoE blocks: compressed experts "
            f"apply to Mixture-of-Experts models; supported families: {supported_families()}"
        )
    raise UnsupportedModelError(
        f"MoE model family {model_type!r} ({type(model).__name__}) is not supported; "
        f"supported families: {supported_families()}"
    )


def moe_blocks(model: nn.Module, family: Family) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) of every sparse MoE block of ``model``, in model order."""
    for name, module in model.named_modules():
        if type(module).__name__ == family.block_class:
            yield name, module


__all__ = ["FAMILIES", "Family", "family_by_name", "family_of", "moe_blocks", "supported_families"]
