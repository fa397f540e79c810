"""OLMoE (allenai/OLMoE-1B-7B): 64 experts, top-8, softmax then top-k, no renormalisation."""

from transformers import OlmoeConfig

from .base import Family


def tiny_config() -> OlmoeConfig:
    """OLMoE's expert count and top-k (64, 8) at a toy width."""
    return OlmoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="OLMoE",
    model_types=("olmoe",),
    block_class="OlmoeSparseMoeBlock",
    router_attr="gate",
    tiny_config=tiny_config,
)
