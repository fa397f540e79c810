"""Tiny random-weight models of every supported family, for offline try-outs and tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .architectures import family_by_name
from .config import check_dtype_name


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """A freshly initialised, tiny causal LM of ``family`` (e.g. "olmoe"), same weights for the same seed.

    Weights start at a larger scale than transformers' default (std 0.1 instead of 0.02) so
    that routing weights are far from uniform and each expert visibly changes the logits:
    otherwise numerical checks at 1e-5 would pass against almost anything.
    """
    config = family_by_name(family).tiny_config()
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    if isinstance(dtype, str):
        check_dtype_name(dtype)
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    # Built in ``dtype`` (not cast afterwards) so buffers such as rotary frequencies stay as a load makes them.
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
