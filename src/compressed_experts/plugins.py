"""Finding plug-ins: every module of a package is imported, and its classes of a kind are collected.

So that adding a model family, a compressed-expert form or a compute backend is one new module
in ``architectures/``, ``forms/`` or ``backends/`` and nothing else: no list to extend.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


def modules(package: ModuleType) -> list[ModuleType]:
    """Every module of ``package``, imported, in name order."""
    return [
        importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)
    ]


def discover(package: ModuleType, base: type[T]) -> list[type[T]]:
    """The subclasses of ``base`` that the modules of ``package`` define and that set a ``name``."""
    modules(package)
    found, pending = [], list(base.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if "name" in vars(cls) and cls.__module__.startswith(package.__name__ + "."):
            found.append(cls)
    return found
