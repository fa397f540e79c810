"""Parameter accounting on the real model shapes: each part counted from the published configs, the
totals against the models' published sizes (OLMoE-1B-7B: ~1.3 B active of ~7 B; Phi-3.5-MoE: ~6.6 B
active), and the saving of replacing n_ce of the k experts by compressed experts."""

from __future__ import annotations

import json

import pytest

import compressed_experts as ce

# The published configs' shape fields (the rest are defaults that do not change parameter counts).
OLMOE_1B_7B = dict(
    model_type="olmoe",
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    tie_word_embeddings=False,
)
PHI_35_MOE = dict(
    model_type="phimoe",
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=6400,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=16,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    attention_bias=True,
)


def skeleton(tmp_path, config, n_ce):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ce.checkpoint.skeleton(tmp_path, n_ce=n_ce)


def test_olmoe_1b_7b_matches_the_worked_example(tmp_path):
    counts = ce.active_parameters(skeleton(tmp_path, OLMOE_1B_7B, n_ce=4))
    hidden, inter, layers, vocab, experts = 2048, 1024, 16, 50304, 64
    expert = 3 * hidden * inter  # 6.29 M
    # Input and output embeddings (untied); q, k, v, o (16 heads of 128) and the q and k norms;
    # a router per layer; two norms per layer and the final one.
    dense = (
        2 * vocab * hidden
        + layers * (4 * hidden * hidden + 2 * hidden)
        + layers * experts * hidden
        + (2 * layers + 1) * hidden
    )
    vectors = 2 * hidden + inter  # one expert's compressed expert: gate, up and down vectors
    assert counts["main_experts"] == layers * 4 * expert
    assert counts["compressed_experts"] == layers * 4 * vectors
    assert counts["active_full_topk"] == dense + layers * 8 * expert == 1_282_017_280  # "~1.3 B active"
    assert counts["active"] == dense + layers * 4 * (expert + vectors)
    assert counts["total"] == dense + layers * experts * (expert + vectors) == 6_924_404_736  # "7B" total
    assert counts["total"] - ce.active_parameters(skeleton(tmp_path, OLMOE_1B_7B, n_ce=None))["total"] == 16 * 64 * 5120
    assert counts["active_saving"] == pytest.approx(0.31, abs=0.01)  # "about 31%"


def test_phi_35_moe_matches_the_worked_example(tmp_path):
    counts = ce.active_parameters(skeleton(tmp_path, PHI_35_MOE, n_ce=1))
    hidden, inter, layers, vocab, experts, kv = 4096, 6400, 32, 32064, 16, 8 * 128
    expert = 3 * hidden * inter
    # Untied embeddings; q and o (H x H) and k and v (8 KV heads of 128), all with biases; a router
    # per layer; LayerNorms (weight and bias), two per layer and the final one.
    dense = (
        2 * vocab * hidden
        + layers * (2 * hidden * hidden + 2 * kv * hidden + 2 * hidden + 2 * kv)
        + layers * experts * hidden
        + (2 * layers + 1) * 2 * hidden
    )
    assert counts["main_experts"] == layers * 1 * expert
    assert counts["active_full_topk"] == dense + layers * 2 * expert == 6_640_967_680  # "~6.6 B active"
    assert counts["active"] == dense + layers * (expert + 2 * hidden + inter)
    assert counts["active_saving"] == pytest.approx(0.38, abs=0.01)  # "about 38%"


def test_parts_against_counts_from_the_config(family):
    model = ce.convert(ce.tiny_model(family), ce.CEConfig(1))
    config, counts = model.config, ce.active_parameters(model)
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = config.tie_word_embeddings
    assert counts["embeddings"] == vocab * hidden * (1 if tied else 2)
    layers = model.model.layers
    assert counts["attention"] == sum(p.numel() for layer in layers for p in layer.self_attn.parameters())
    experts = ce.describe(model)["moe_blocks"]
    inter = next(m for m in model.modules() if isinstance(m, ce.CompressedExperts)).intermediate_dim
    assert counts["main_experts"] == experts * (config.num_experts_per_tok - 1) * 3 * hidden * inter
    assert counts["compressed_experts"] == experts * (2 * hidden + inter)
    num_experts = ce.describe(model)["experts"]
    assert counts["routers"] == experts * num_experts * hidden  # one [E, H] router weight per block
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and "self_attn" not in n)
    dense = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".mlp." in n and ".experts." not in n and "gate.weight" not in n and "router" not in n and "shared" not in n
    )
    assert counts["other"] == norms + dense
    shared = [
        getattr(layer.mlp, name)
        for layer in layers
        for name in ("shared_expert", "shared_expert_gate", "shared_experts")
        if hasattr(layer.mlp, name)
    ]
    assert counts["shared_experts"] == sum(p.numel() for module in shared for p in module.parameters())
    assert bool(shared) == (family in ("qwen2_moe", "deepseek_v3"))
    plain = ce.active_parameters(ce.tiny_model(family))
    assert plain["active"] == plain["active_full_topk"] == counts["active_full_topk"]
    assert plain["active_saving"] == 0.0


def test_top_m_counts_main_experts_only():
    ce_model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4))
    top_m = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4, "none"))
    with_vectors, without = ce.active_parameters(ce_model), ce.active_parameters(top_m)
    config = ce_model.config  # 2 MoE blocks, 4 auxiliary experts a token, each its 2 H + I vectors
    assert without["compressed_experts"] == 0
    assert with_vectors["compressed_experts"] == 2 * 4 * (2 * config.hidden_size + config.intermediate_size)
    assert without["active"] == with_vectors["active"] - with_vectors["compressed_experts"]
    assert without["total"] == with_vectors["total"] - with_vectors["compressed_experts"] // 4 * 64
    assert ce.describe(top_m)["form"] == "none"


def test_describe_reports_the_structure():
    info = ce.describe(ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4)))
    assert (info["family"], info["moe_blocks"], info["experts"], info["top_k"], info["n_ce"]) == ("OLMoE", 2, 64, 8, 4)
    assert info["main_experts_per_token"] == 4
