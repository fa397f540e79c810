"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): routed experts plus a gated shared expert."""

from transformers import Qwen2MoeConfig

from .base import Family


def tiny_config() -> Qwen2MoeConfig:
    """Qwen2-MoE's layout at a toy width: 8 routed experts, top-4, one shared expert."""
    return Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="Qwen2-MoE",
    model_types=("qwen2_moe",),
    block_class="Qwen2MoeSparseMoeBlock",
    router_attr="gate",
    shared_attrs=("shared_expert", "shared_expert_gate"),
    tiny_config=tiny_config,
)
