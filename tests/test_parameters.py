"""Parameter accounting, checked against the worked figures of method.md on the real model shapes."""

from __future__ import annotations

import json

import pytest

import compressed_experts as ce

# The published configs' shape fields (the rest are defaults that do not change parameter counts).
OLMOE_1B_7B = dict(
    model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, tie_word_embeddings=False,
)
PHI_35_MOE = dict(
    model_type="phimoe", vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
    tie_word_embeddings=False, attention_bias=True,
)


def skeleton(tmp_path, config, n_ce):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ce.checkpoint.skeleton(tmp_path, n_ce=n_ce)


def test_olmoe_1b_7b_matches_the_worked_example(tmp_path):
    counts = ce.active_parameters(skeleton(tmp_path, OLMOE_1B_7B, n_ce=4))
    expert = 3 * 2048 * 1024  # 6.29 M
    assert counts["main_experts"] == 16 * 4 * expert
    assert counts["compressed_experts"] == 16 * 4 * (2 * 2048 + 1024)
    assert counts["active_full_topk"] - counts["active"] == 16 * 4 * expert - counts["compressed_experts"]
    assert 1.25e9 < counts["active_full_topk"] < 1.35e9  # "~1.3 B active"
    assert 6.8e9 < counts["total"] < 7.0e9  # "7B" total, 5.2 M of it compressed experts
    assert counts["total"] - ce.active_parameters(skeleton(tmp_path, OLMOE_1B_7B, n_ce=None))["total"] == 16 * 64 * 5120
    assert counts["active_saving"] == pytest.approx(0.31, abs=0.01)  # "about 31%"


def test_phi_35_moe_matches_the_worked_example(tmp_path):
    counts = ce.active_parameters(skeleton(tmp_path, PHI_35_MOE, n_ce=1))
    assert counts["main_experts"] == 32 * 1 * 3 * 4096 * 6400
    assert 6.4e9 < counts["active_full_topk"] < 6.8e9  # "~6.6 B active"
    assert counts["active_saving"] == pytest.approx(0.38, abs=0.01)  # "about 38%"


def test_parts_against_counts_from_the_config(family):
    model = ce.convert(ce.tiny_model(family), ce.CEConfig(1))
    config, counts = model.config, ce.active_parameters(model)
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = config.tie_word_embeddings
    assert counts["embeddings"] == vocab * hidden * (1 if tied else 2)
    assert counts["attention"] > 0
    experts = ce.describe(model)["moe_blocks"]
    inter = next(m for m in model.modules() if isinstance(m, ce.CompressedExperts)).intermediate_dim
    assert counts["main_experts"] == experts * (config.num_experts_per_tok - 1) * 3 * hidden * inter
    assert counts["compressed_experts"] == experts * (2 * hidden + inter)
    num_experts = ce.describe(model)["experts"]
    assert counts["routers"] == experts * num_experts * hidden  # one [E, H] router weight per block
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and "self_attn" not in n)
    dense = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n and ".experts." not in n
                and "gate.weight" not in n and "router" not in n and "shared" not in n)
    assert counts["other"] == norms + dense
    assert (counts["shared_experts"] > 0) == (family in ("qwen2_moe", "deepseek_v3"))
    plain = ce.active_parameters(ce.tiny_model(family))
    assert plain["active"] == plain["active_full_topk"] == counts["active_full_topk"]
    assert plain["active_saving"] == 0.0


def test_top_m_counts_main_experts_only():
    ce_model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4))
    top_m = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4, "none"))
    with_vectors, without = ce.active_parameters(ce_model), ce.active_parameters(top_m)
    assert without["compressed_experts"] == 0 and with_vectors["compressed_experts"] > 0
    assert without["active"] == with_vectors["active"] - with_vectors["compressed_experts"]
    assert without["total"] == with_vectors["total"] - with_vectors["compressed_experts"] // 4 * 64
    assert ce.describe(top_m)["form"] == "none"


def test_describe_reports_the_structure():
    info = ce.describe(ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4)))
    assert (info["family"], info["moe_blocks"], info["experts"], info["top_k"], info["n_ce"]) == ("OLMoE", 2, 64, 8, 4)
    assert info["main_experts_per_token"] == 4
