"""The compressed-expert forms: what stands in for a token's auxiliary experts, one module each.

To add a form, write a :class:`~compressed_experts.forms.base.Form` subclass with a ``name`` and
a ``rank`` in a module of its own here: the registry finds it, and ``CEConfig``, conversion,
parameter counts, fitting, saving and the CLI's ``--form`` take it from the registry.
"""

from __future__ import annotations

import sys

from ..errors import CompressedExpertsError
from ..plugins import discover
from .base import Form
from .none import NoForm

_ALL: tuple[Form, ...] = tuple(cls() for cls in sorted(discover(sys.modules[__name__], Form), key=lambda c: c.rank))
REGISTRY: dict[str, Form] = {form.name: form for form in _ALL}

#: Names of every form, the default first.
FORMS: tuple[str, ...] = tuple(REGISTRY)
#: The form that adds nothing: the top-m baseline (training calls it method top-m, not a form of ce).
TOP_M = NoForm.name
#: The forms whose auxiliary experts are gated MLPs of ``r`` intermediate neurons.
NEURON_FORMS: tuple[str, ...] = tuple(name for name, form in REGISTRY.items() if form.takes_r)
#: Names of every parameter any form adds: how a parameter is recognised as a compressed expert's.
CE_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(p for form in _ALL for p in form.parameters))


def get_form(name: str) -> Form:
    """The form called ``name``, or a clear error listing the forms."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise CompressedExpertsError(
            f"unknown compressed-expert form {name!r}; choose from {', '.join(FORMS)}"
        ) from None


def is_compressed_expert(name: str) -> bool:
    """Whether a (dotted) parameter name belongs to compressed experts."""
    return name.rsplit(".", 1)[-1] in CE_PARAMETERS


__all__ = ["CE_PARAMETERS", "FORMS", "NEURON_FORMS", "REGISTRY", "TOP_M", "Form", "get_form", "is_compressed_expert"]
