"""Tensor parallelism of the vLLM plugin without vLLM: each tensor is cut as the plugin cuts it
(compressed_experts.serving.sharding), each rank's block computes its partial output, and the
partial outputs must sum to the unsharded block's (what vLLM's all-reduce does)."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed_layers
from torch import nn

import compressed_experts as ce
from compressed_experts.errors import CompressedExpertsError
from compressed_experts.routing import main_slots
from compressed_experts.serving.sharding import local_settings, shard

# (form, r): subset with r inside the first rank's neurons (the second rank runs its main experts
# only) and spanning both ranks; slim with r split evenly.
CASES = [("none", None), ("ia3", None), ("subset", 4), ("subset", 12), ("slim", 6)]
# A fixed n_ce, and the per-token rules: each rank computes the rule from the same (replicated)
# routing, so every rank splits each token the same way and the partial outputs still add up.
RULES = [{"n_ce": 3}, {"top_p": 0.6}, {"skip_below": 0.3}]


def _perturbed_layer(form: str, r: int | None, rule: dict) -> ce.CompressedExperts:
    model = ce.from_pretrained("tiny:olmoe", form=form, r=r, dtype="float32", **rule)  # I = 16
    layer = compressed_layers(model)[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if ce.layer.is_compressed_expert(name):
                param.mul_(torch.empty(param.shape).uniform_(0.3, 1.7, generator=generator))
    return layer


def _rank_layer(full: ce.CompressedExperts, tp: int, rank: int) -> ce.CompressedExperts:
    form, r = local_settings(full.form, full.r, full.intermediate_dim, tp, rank)
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(shard("gate_up_proj", full.gate_up_proj.detach(), tp, rank).clone())
    experts.down_proj = nn.Parameter(shard("down_proj", full.down_proj.detach(), tp, rank).clone())
    experts.act_fn = full.act_fn
    local = ce.CompressedExperts(experts, full.n_ce, form=form, r=r, top_p=full.top_p, skip_below=full.skip_below)
    with torch.no_grad():
        for name in local.form_spec.parameters:
            getattr(local, name).copy_(shard(name, getattr(full, name).detach(), tp, rank))
    return local


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: "{}={}".format(*next(iter(rule.items()))))
@pytest.mark.parametrize(("form", "r"), CASES)
def test_rank_outputs_sum_to_the_unsharded_block(form, r, rule):
    full = _perturbed_layer(form, r, rule)
    generator = torch.Generator().manual_seed(0)
    tokens, k = 24, 8
    x = torch.randn(tokens, full.hidden_dim, generator=generator)
    logits = torch.randn(tokens, full.num_experts, generator=generator)
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    with torch.no_grad():
        expected = full(x, index, weights)
        ranks = [_rank_layer(full, 2, rank) for rank in range(2)]
        partial = [layer(x, index, weights) for layer in ranks]
        full_top_k = full.full(x, index, weights)  # the full top-k block, to check the form mattered
    assert torch.allclose(partial[0] + partial[1], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(partial[0], expected, atol=1e-3)  # each rank alone is only part of it
    assert not torch.allclose(expected, full_top_k, atol=1e-3)
    if full.dynamic:  # the rule keeps a number of main experts that varies from token to token
        mains = main_slots(weights, full.top_p, full.skip_below).sum(-1)
        assert ranks[0].dynamic and mains.min() < mains.max()
    if form == "subset":  # the second rank holds none of the first 4 neurons: main experts only
        assert [layer.form for layer in ranks] == (["subset", "none"] if r == 4 else ["subset", "subset"])


def test_sizes_that_do_not_split_are_refused():
    with pytest.raises(CompressedExpertsError, match="does not divide"):
        local_settings("ia3", None, 15, 2, 0)
    with pytest.raises(CompressedExpertsError, match="slim form's r=5"):
        local_settings("slim", 5, 16, 2, 0)
