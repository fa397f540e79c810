"""Mixtral (mistralai/Mixtral-8x7B): 8 experts, top-2, renormalised top-k weights."""

from transformers import MixtralConfig

from .base import Family


def tiny_config() -> MixtralConfig:
    """Mixtral's layout at a toy width, with top-4 of 8 so that n_ce can be 1 to 3."""
    return MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="Mixtral",
    model_types=("mixtral",),
    block_class="MixtralSparseMoeBlock",
    router_attr="gate",
    tiny_config=tiny_config,
)
