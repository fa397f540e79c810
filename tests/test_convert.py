"""Conversion: structure, and clear errors for models and settings it cannot take."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeConfig, LlamaConfig

import compressed_experts as ce
from compressed_experts.architectures import family_of, moe_blocks


def test_conversion_keeps_router_and_expert_weights(family):
    model = ce.tiny_model(family)
    spec = family_of(model)
    before = {
        name: (getattr(b, spec.router_attr), b.experts.gate_up_proj, b.experts.down_proj)
        for name, b in moe_blocks(model, spec)
    }
    ce.convert(model, ce.CEConfig(1))
    assert ce.ce_config_of(model) == ce.CEConfig(1)
    for name, block in moe_blocks(model, spec):
        router, gate_up, down = before[name]
        assert getattr(block, spec.router_attr) is router
        assert block.experts.gate_up_proj is gate_up and block.experts.down_proj is down
        assert isinstance(block.experts, ce.CompressedExperts)
        for attr in spec.shared_attrs:
            assert not isinstance(getattr(block, attr), ce.CompressedExperts)
    # Every decoder layer whose MLP holds routed experts, and nothing else, is an MoE block (deepseek_v3's
    # first layers are dense).
    assert list(before) == [
        f"model.layers.{i}.mlp" for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")
    ]
    assert len(before) == model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)


def test_dense_model_says_it_has_no_moe_blocks():
    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ce.UnsupportedModelError, match="has no MoE blocks"):
        ce.convert(dense, ce.CEConfig(1))


def test_unsupported_moe_family_lists_the_supported_ones():
    granite = AutoModelForCausalLM.from_config(
        GraniteMoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )
    with pytest.raises(
        ce.UnsupportedModelError, match="not supported.*DeepSeek-V3.*Mixtral.*OLMoE.*PhiMoE.*Qwen2-MoE.*Qwen3-MoE"
    ):
        ce.convert(granite, ce.CEConfig(1))


@pytest.mark.parametrize("n_ce", [8, 9])
def test_n_ce_must_be_smaller_than_top_k(n_ce):
    model = ce.tiny_model("olmoe")
    with pytest.raises(ce.CompressedExpertsError, match=rf"n_ce={n_ce} must be smaller than the model's top-k \(8\)"):
        ce.convert(model, ce.CEConfig(n_ce))
    assert ce.ce_config_of(model) is None  # nothing was changed


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_config_rejects_bad_n_ce(bad):
    with pytest.raises(ce.CompressedExpertsError, match="n_ce"):
        ce.CEConfig(bad)


def test_converting_twice_is_refused():
    model = ce.convert(ce.tiny_model("mixtral"), ce.CEConfig(1))
    with pytest.raises(ce.CompressedExpertsError, match="already has compressed experts"):
        ce.convert(model, ce.CEConfig(2))


def test_convert_needs_a_ceconfig():
    with pytest.raises(ce.CompressedExpertsError, match="CEConfig"):
        ce.convert(ce.tiny_model("olmoe"), 4)


def test_compressed_experts_follow_the_model_dtype_and_device():
    model = ce.convert(ce.tiny_model("qwen3_moe", dtype=torch.bfloat16), ce.CEConfig(2))
    layer = next(m for m in model.modules() if isinstance(m, ce.CompressedExperts))
    assert layer.ce_gate.dtype == torch.bfloat16 and layer.ce_gate.device == layer.gate_up_proj.device
