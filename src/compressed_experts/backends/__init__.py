"""Compute backends: how a compressed-experts block computes its expert products, one module each.

``eager`` is the per-token reference; ``grouped`` (torch's grouped_mm), ``loop`` (a matmul per
expert) and ``decode`` (fused Triton kernels for a few tokens on CUDA) are the fast ones. Each
says whether it can run a call and why not. ``auto`` is the ordered preference list
:data:`AUTO`, decided here and nowhere else. To add a backend, write a
:class:`~compressed_experts.backends.base.Backend` subclass with a ``name`` in a module of its
own here: the package finds it, and ``set_compute_path`` takes it; list it in :data:`AUTO`
where ``auto`` should consider it.
"""

from __future__ import annotations

import sys

from ..errors import CompressedExpertsError
from ..plugins import discover
from ..routing import Call
from .base import Backend

BACKENDS: dict[str, Backend] = {
    cls.name: cls() for cls in sorted(discover(sys.modules[__name__], Backend), key=lambda c: c.name)
}
#: ``auto``: the first of these that can run a call and prefers it. The last, loop, runs anywhere
#: and always prefers. A new backend joins auto only when it is listed here, where it should rank.
AUTO: tuple[Backend, ...] = tuple(BACKENDS[name] for name in ("decode", "grouped", "loop"))
#: What ``set_compute_path`` accepts.
PATHS: tuple[str, ...] = ("auto", *BACKENDS)


def check_path(path: str) -> None:
    """Refuse a compute path that names no backend, listing those that do."""
    if path not in PATHS:
        raise CompressedExpertsError(f"unknown compute path {path!r}; choose from {', '.join(PATHS)}")


def choose(path: str, call: Call) -> Backend:
    """The backend that computes ``call`` under compute path ``path``; a clear error when a forced one cannot."""
    if path == "auto":
        for backend in AUTO:
            if backend.preferred(call) and backend.unavailable(call) is None:  # preferred is the cheap test
                return backend
        raise CompressedExpertsError(
            f"no compute backend can run the {call.layer.form} form here: {AUTO[-1].unavailable(call)}"
        )
    backend = BACKENDS[path]
    reason = backend.unavailable(call)
    if reason is not None:
        raise CompressedExpertsError(f"the {path} path cannot run here: {reason}; use path 'auto'")
    return backend


__all__ = ["AUTO", "BACKENDS", "PATHS", "Backend", "check_path", "choose"]
