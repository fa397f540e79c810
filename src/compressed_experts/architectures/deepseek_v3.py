"""DeepSeek-V3 style: grouped top-k routing with a score-correction bias, plus shared experts.

The first ``first_k_dense_replace`` layers are dense MLPs and are left alone.
"""

from transformers import DeepseekV3Config

from .base import Family


def tiny_config() -> DeepseekV3Config:
    """DeepSeek-V3's routing (16 experts in 4 groups, 2 groups kept, top-4) at a toy width."""
    return DeepseekV3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="DeepSeek-V3",
    model_types=("deepseek_v3",),
    block_class="DeepseekV3MoE",
    router_attr="gate",
    shared_attrs=("shared_experts",),
    tiny_config=tiny_config,
)
