"""The ``compressed-experts`` command: one module per command group, over the library's public functions.

``model`` (info, convert, fit), ``plan``, ``prune``, ``train``, ``evaluate`` (eval, compare), ``bench``, ``experiments``
(demo, toy forms, toy pretrain). No library module imports this package.
"""

from . import bench, evaluate, experiments, model, plan, prune, serve, train  # noqa: F401  (each registers its commands)
from .app import app

__all__ = ["app"]
