"""Qwen3-MoE (Qwen/Qwen3-30B-A3B): 128 experts, top-8, renormalised, no shared expert."""

from transformers import Qwen3MoeConfig

from .base import Family


def tiny_config() -> Qwen3MoeConfig:
    """Qwen3-MoE's layout at a toy width: 16 experts, top-4, renormalised weights."""
    return Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    block_class="Qwen3MoeSparseMoeBlock",
    router_attr="gate",
    tiny_config=tiny_config,
)
