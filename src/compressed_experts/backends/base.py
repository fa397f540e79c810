"""The interface every compute backend implements.

A backend computes one call of a compressed-experts block (:class:`~compressed_experts.routing.Call`):
it says whether it can run a given call, and why not, and runs it. Adding a backend is one
module in this package that defines a subclass with a ``name``: the package finds it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..routing import Call


class Backend:
    name: ClassVar[str]

    def unavailable(self, call: Call) -> str | None:
        """Why this backend cannot compute ``call`` (a phrase that completes "cannot run here: ..."), or None."""
        if self.name not in call.layer.form_spec.backends and call.compresses:
            return f"the {call.layer.form} form has no {self.name} implementation"
        return None

    def preferred(self, call: Call) -> bool:
        """Whether ``auto`` should take this backend for ``call`` when it can run it (measured, per backend)."""
        return True

    def run(self, call: Call) -> torch.Tensor:
        """The block's output ``[T, H]`` in the input's dtype."""
        raise NotImplementedError
