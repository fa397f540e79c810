"""Compressed experts for Mixture-of-Experts language models (He et al., 2025).

For each token keep the ``k - n_ce`` most important routed experts and replace the other
``n_ce`` by tiny learned vectors. Public API::

    import compressed_experts as ce
    model = ce.from_pretrained("allenai/OLMoE-1B-7B-0924", n_ce=4)   # or ce.convert(model, ce.CEConfig(4))
    ce.active_parameters(model)
    model.save_pretrained("olmoe-ce")                                  # ce.from_pretrained("olmoe-ce")
    ce.train(ce.TrainConfig(model="allenai/OLMoE-1B-7B-0924", data="TIGER-Lab/MathInstruct", out="run", method="ce"))

    # A per-token rule instead of a fixed n_ce: as many full experts as cover 60% of the token's routing
    # weight (or skip_below=0.3: those above 30% of its top weight); active parameters measured on text.
    model = ce.from_pretrained("allenai/OLMoE-1B-7B-0924", top_p=0.6)
    ce.active_parameters(model, input_ids=token_ids)

    # Other forms of compressed experts, fitted to the full blocks on calibration text (no fine-tuning):
    model = ce.from_pretrained("allenai/OLMoE-1B-7B-0924", n_ce=4, form="slim")
    ce.fit(model, ce.calibration_blocks(ce.load_tokenizer("allenai/OLMoE-1B-7B-0924"), "my_domain.jsonl"))
"""

from .architectures import FAMILIES
from .checkpoint import apply_compressed_experts, from_pretrained, load_tokenizer, save_compressed_experts
from .config import CEConfig
from .convert import ce_config_of, convert, float32_compressed_experts
from .errors import CheckpointError, CompressedExpertsError, UnsupportedModelError
from .fit import FitConfig, calibration_blocks, fit
from .layer import CompressedExperts, set_compute_path
from .parameters import active_parameters, describe
from .tiny import tiny_model, tiny_tokenizer
from .training import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "CEConfig",
    "FitConfig",
    "TrainConfig",
    "TrainResult",
    "CheckpointError",
    "CompressedExperts",
    "CompressedExpertsError",
    "UnsupportedModelError",
    "active_parameters",
    "apply_compressed_experts",
    "calibration_blocks",
    "ce_config_of",
    "convert",
    "describe",
    "fit",
    "float32_compressed_experts",
    "from_pretrained",
    "load_tokenizer",
    "save_compressed_experts",
    "set_compute_path",
    "tiny_model",
    "tiny_tokenizer",
    "train",
]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):  # the Trainer is imported on first use (see training/__init__.py)
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
