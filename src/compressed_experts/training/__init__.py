"""Supervised fine-tuning of full top-k, top-m and compressed-experts models on the transformers Trainer."""

from ..text import alpaca_prompt
from .config import METHODS, PRECISIONS, TRAINABLE, TrainConfig

__all__ = [
    "METHODS",
    "PRECISIONS",
    "TRAINABLE",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "alpaca_prompt",
    "train",
]
_LAZY = {"train": "run", "TrainResult": "run", "TrainingDiverged": "trainer"}


def __getattr__(name: str):
    # The Trainer pulls in accelerate and more: imported on first use, so the CLI starts fast.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
