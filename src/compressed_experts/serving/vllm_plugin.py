"""The vLLM plugin: vLLM loads it in every process through the ``vllm.general_plugins`` entry point.

:func:`register` teaches vLLM the compressed-experts checkpoints: importing the library registers
their config with transformers' ``AutoConfig`` (what vLLM reads config.json with), and each
architecture a saved config.json names (``CompressedExperts<Base>ForCausalLM``) is registered with
vLLM's model registry, lazily, as a class of :mod:`compressed_experts.serving.vllm_models`.
Without the plugin, vLLM refuses such a checkpoint (transformers does not know its model type),
instead of serving its base family with the compressed experts dropped.
"""

from __future__ import annotations

from ..config import ARCHITECTURE_PREFIX

#: The base architectures, as transformers names them, whose compressed-experts checkpoints vLLM serves.
BASE_ARCHITECTURES = (
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "PhimoeForCausalLM",
    "DeepseekV3ForCausalLM",
)
ARCHITECTURES = tuple(ARCHITECTURE_PREFIX + base for base in BASE_ARCHITECTURES)


def register() -> None:
    """The entry point: register the compressed-experts architectures with vLLM (idempotent)."""
    from vllm import ModelRegistry

    from .. import auto_classes

    auto_classes.register()  # AutoConfig knows model_type compressed_experts
    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, f"compressed_experts.serving.vllm_models:{arch}")
