"""PhiMoE (microsoft/Phi-3.5-MoE-instruct): 16 experts, top-2 picked by sparsemixer."""

from transformers import PhimoeConfig

from .base import Family


def tiny_config() -> PhimoeConfig:
    """Phi-3.5-MoE's expert count and top-k (16, 2: sparsemixer only does top-2) at a toy width.

    sparsemixer's threshold (``router_jitter_noise``) is raised from 0.01 to 0.3: at this width
    the default masks so much that nearly every routing weight is exactly 1.0, and tests of
    how weights are ordered and averaged would see nothing.
    """
    return PhimoeConfig(
        router_jitter_noise=0.3,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


FAMILY = Family(
    name="PhiMoE",
    model_types=("phimoe",),
    block_class="PhimoeSparseMoeBlock",
    router_attr="router",
    tiny_config=tiny_config,
)
