"""Expert pruning (issue 18, part 1): exact routing over the kept experts, ranking, save/load, counts, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.phimoe.modeling_phimoe import sparsemixer
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.architectures import family_of, moe_blocks
from compressed_experts.checkpoint import save_model
from compressed_experts.cli import app
from compressed_experts.errors import CompressedExpertsError, UnsupportedModelError
from compressed_experts.parameters import active_parameters
from compressed_experts.prune import (
    expert_scores,
    kept_experts,
    kept_first,
    min_calibration_tokens,
    prune,
    remove_experts,
)

runner = CliRunner()
# family -> experts kept (at least top-k; phimoe and mixtral keep exactly top-k; deepseek_v3: 2 of
# each group's 4, the fewest its grouped routing allows)
KEEP = {"olmoe": 16, "mixtral": 4, "qwen2_moe": 5, "qwen3_moe": 7, "phimoe": 2, "deepseek_v3": 8}


def _experts(model) -> int:
    return next(block for _, block in moe_blocks(model, family_of(model))).experts.gate_up_proj.shape[0]


def _random_kept(model, keep: int, seed: int = 1) -> dict[str, list[int]]:
    """A random choice per block; for a grouped router (DeepSeek-V3) as many from each group."""
    generator = torch.Generator().manual_seed(seed)
    groups = getattr(model.config, "n_group", None) or 1
    size = _experts(model) // groups
    return {
        name: sorted(
            g * size + i
            for g in range(groups)
            for i in torch.randperm(size, generator=generator)[: keep // groups].tolist()
        )
        for name, _ in moe_blocks(model, family_of(model))
    }


def _tiny(family: str):
    """A tiny model of the family; DeepSeek-V3's score-correction biases made random (they start at 0),
    so that dropping the removed experts' entries is checked too."""
    model = ce.tiny_model(family)
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(torch.rand(module.e_score_correction_bias.shape, generator=generator))
    return model


def _mask_router(family: str, block, router, removed: torch.Tensor, config) -> None:
    """The reference: the unpruned router with the removed experts' logits set to -inf, routed by hand
    (softmax, top-k, the family's renormalisation; PhiMoE through transformers' own sparsemixer)."""

    def grouped(hidden):  # DeepSeek-V3: sigmoid scores, bias for the choice, the best groups by their two best
        logits = F.linear(hidden.float(), router.weight.float())
        scores = torch.sigmoid(logits)
        choice = (scores + router.e_score_correction_bias).masked_fill(removed, float("-inf"))
        groups = config.n_group
        best = choice.view(len(choice), groups, -1).topk(2, dim=-1).values.sum(-1).topk(config.topk_group).indices
        searched = torch.zeros(len(choice), groups, dtype=torch.bool).scatter_(1, best, True)
        searched = searched.repeat_interleave(choice.shape[1] // groups, dim=1)
        index = choice.masked_fill(~searched, float("-inf")).topk(config.num_experts_per_tok).indices
        weights = scores.gather(1, index)
        if config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights * config.routed_scaling_factor, index

    def forward(hidden):
        hidden = hidden.reshape(-1, router.weight.shape[1])
        if family == "deepseek_v3":
            return grouped(hidden)
        logits = F.linear(hidden, router.weight).masked_fill(removed, float("-inf"))
        if family == "phimoe":
            weights, index = sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=2)
            return logits, weights, index
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, config.num_experts_per_tok, dim=-1)
        if family == "mixtral" or config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), index

    router.forward = forward


@pytest.mark.parametrize("family", sorted(KEEP))
def test_pruned_model_equals_router_masked_to_kept_experts(family):
    reference, pruned = _tiny(family), _tiny(family)
    kept = _random_kept(pruned, KEEP[family])
    fam = family_of(reference)
    for name, block in moe_blocks(reference, fam):
        removed = torch.ones(_experts(reference), dtype=torch.bool)
        removed[kept[name]] = False
        _mask_router(family, block, getattr(block, fam.router_attr), removed, reference.config)
    remove_experts(pruned, kept)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, pruned(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _experts(pruned) == KEEP[family]
    # and the pruning changed something: the unmasked model differs
    assert not torch.allclose(_tiny(family)(ids).logits, got, atol=1e-3)


def test_one_pruned_block_by_hand():
    """OLMoE block: softmax over the kept experts' logits, top-8, no renormalisation, summed expert MLPs."""
    model = ce.tiny_model("olmoe")
    name, block = next(moe_blocks(model, family_of(model)))
    gate_up, down, router = (
        block.experts.gate_up_proj.clone(),
        block.experts.down_proj.clone(),
        block.gate.weight.clone(),
    )
    kept = _random_kept(model, 12)
    remove_experts(model, kept)
    x = torch.randn(10, router.shape[1], generator=torch.Generator().manual_seed(3))
    ids = kept[name]
    logits = x @ router[ids].T
    probs = torch.softmax(logits, dim=-1)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, slots = probs[t].topk(8)
        for w, slot in zip(weights, slots):
            e = ids[slot]
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            want[t] += w * (down[e] @ (F.silu(gate) * up))
    with torch.no_grad():
        got = block(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scores_match_their_definitions_and_prune_keeps_the_top():
    model = ce.tiny_model("olmoe")
    blocks = torch.randint(4, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    name, block = next(moe_blocks(model, family_of(model)))
    seen = {}
    handle = block.experts.register_forward_pre_hook(lambda m, a: seen.update(args=a))
    scores = expert_scores(model, blocks, batch_size=4)[name]
    handle.remove()
    x, index, weights = seen["args"]
    tokens = index.shape[0]
    assert scores["frequency"].sum().item() == tokens * 8
    e = int(index[0, 0])
    rows, slots = (index == e).nonzero(as_tuple=True)
    assert scores["frequency"][e].item() == len(rows)
    torch.testing.assert_close(scores["mass"][e].float(), weights[rows, slots].sum(), rtol=1e-5, atol=1e-6)
    gate, up = (x[rows] @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
    norms = ((F.silu(gate) * up) @ block.experts.down_proj[e].T).norm(dim=-1)
    torch.testing.assert_close(
        scores["saliency"][e].float(), (weights[rows, slots] * norms).sum(), rtol=1e-5, atol=1e-6
    )

    for criterion in ("saliency", "mass", "frequency"):
        pruned = ce.tiny_model("olmoe")
        report = prune(pruned, blocks, keep=20, criterion=criterion)
        best = set(torch.argsort(-scores[criterion], stable=True)[:20].tolist())
        assert set(report["blocks"][0]["kept"]) == best == set(kept_experts(scores[criterion], 20))
        # the share of the criterion's total that the kept experts carry: the largest any 20 can
        top = scores[criterion].sort(descending=True).values[:20].sum() / scores[criterion].sum()
        assert report["blocks"][0][f"{criterion}_kept"] == pytest.approx(top.item())
        assert _experts(pruned) == 20 and pruned.config.num_experts == 20


def test_save_load_round_trip_native_and_library(tmp_path):
    model = ce.tiny_model("qwen2_moe")
    remove_experts(model, _random_kept(model, 5))
    save_model(model, tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["model_type"] == "qwen2_moe" and saved["num_experts"] == 5
    ids = torch.randint(4, 128, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        library = ce.from_pretrained(tmp_path / "pruned")
        native = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
        assert torch.equal(library(ids).logits, want)
        assert torch.equal(native.eval()(ids).logits, want)
        # a pruned model converts like any other: compressed experts over the kept experts
        converted = ce.from_pretrained(tmp_path / "pruned", n_ce=2)
        assert converted(ids).logits.shape == want.shape
    assert ce.describe(converted)["experts"] == 5


def test_parameter_counts_by_hand():
    model = ce.tiny_model("olmoe")  # H=32, I=16, 64 experts, top-8, 2 MoE blocks
    before = active_parameters(model)
    remove_experts(model, _random_kept(model, 16))
    after = active_parameters(model)
    per_expert, router_row, removed, layers = 3 * 32 * 16, 32, 64 - 16, 2
    assert after["total"] == before["total"] - layers * removed * (per_expert + router_row)
    assert after["total"] == sum(p.numel() for p in model.parameters())
    assert after["routers"] == layers * 16 * router_row
    assert after["main_experts"] == before["main_experts"] == layers * 8 * per_expert  # still top-8 per token
    assert after["active"] == before["active"] - layers * removed * router_row


def _no_forward(model):
    def refuse(*_):
        raise AssertionError("the model ran before the input was checked")

    model.register_forward_pre_hook(refuse)
    return model


@pytest.mark.parametrize(
    ("keep", "words"),
    [(0, "every expert"), (4, "fewer than the 8 experts"), (64, "prunes nothing"), (1.5, "whole number")],
)
def test_bad_keep_refused_before_any_work(keep, words):
    model = _no_forward(ce.tiny_model("olmoe"))
    with pytest.raises(CompressedExpertsError, match=words):
        prune(model, torch.randint(4, 128, (8, 64)), keep=keep)


def test_bad_input_refused_before_any_work():
    model = _no_forward(ce.tiny_model("olmoe"))
    least = min_calibration_tokens(64, 8)
    with pytest.raises(CompressedExpertsError, match="too few to rank 64 experts"):
        prune(model, torch.randint(4, 128, (1, least - 1)), keep=16)
    with pytest.raises(CompressedExpertsError, match="criterion must be one of"):
        prune(model, torch.randint(4, 128, (8, 64)), keep=16, criterion="random")
    deepseek = _no_forward(ce.tiny_model("deepseek_v3"))  # 16 experts in 4 groups, 2 searched, top-4
    for keep in (6, 4):  # not a multiple of the groups; one per group (a group's score needs two)
        with pytest.raises(CompressedExpertsError, match="every group keeps as many experts.*keep one of 8, 12"):
            prune(deepseek, torch.randint(4, 128, (8, 64)), keep=keep)
    with pytest.raises(UnsupportedModelError, match="stand-ins for DeepSeek-V3 are not supported"):
        prune(deepseek, torch.randint(4, 128, (8, 64)), keep=8, stand_in="slim")
    with pytest.raises(UnsupportedModelError, match="would move experts between groups"):
        kept_first(
            deepseek, {name: [0, 1, 4, 5, 8, 9, 12, 13] for name, _ in moe_blocks(deepseek, family_of(deepseek))}
        )
    with pytest.raises(CompressedExpertsError, match="same number of experts kept in each of its 4 groups"):
        remove_experts(
            deepseek, {name: [0, 1, 2, 3, 4, 5, 8, 9] for name, _ in moe_blocks(deepseek, family_of(deepseek))}
        )
    with pytest.raises(CompressedExpertsError, match="prune the plain model, then convert"):
        prune(_no_forward(ce.from_pretrained("tiny:olmoe", n_ce=2)), torch.randint(4, 128, (8, 64)), keep=16)
    assert _experts(model) == 64


def test_cli_prunes_saves_and_refuses(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(200)))
    out = tmp_path / "pruned"
    result = runner.invoke(
        app,
        [
            "prune",
            "tiny:mixtral",
            "--keep",
            "5",
            "--out",
            str(out),
            "--calib",
            str(calib),
            "--tokens",
            "512",
            "--seq-len",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune_report.json").read_text())
    assert report["experts_before"] == 8 and report["experts_after"] == 5 and report["criterion"] == "mass"
    assert ce.describe(ce.from_pretrained(out))["experts"] == 5
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "Mixtral" in info.output

    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 8)  # 48 tokens: fewer than the 64 that 8 experts at top-4 need
    for args, words in (
        (["--keep", "0"], "every expert"),
        (["--keep", "5", "--calib", str(short), "--seq-len", "16"], "too few to rank 8 experts"),
        (["--keep", "5", "--tokens", "32", "--seq-len", "16"], "too few to rank"),
    ):
        result = runner.invoke(app, ["prune", "tiny:mixtral", "--out", str(tmp_path / "bad"), *args])
        assert result.exit_code == 2 and words in result.output, result.output
        assert not (tmp_path / "bad").exists()


def test_deepseek_prunes_group_balanced_and_loads_natively(tmp_path):
    """The best experts of each routing group are kept (as many per group), and the result is a plain
    DeepSeek-V3 that transformers loads with the same logits."""
    model = _tiny("deepseek_v3")
    blocks = torch.randint(4, 128, (8, 64), generator=torch.Generator().manual_seed(2))
    mass = {name: sums["mass"] for name, sums in expert_scores(model, blocks, saliency=False).items()}
    report = prune(model, blocks, keep=8)
    for row in report["blocks"]:
        scores = mass[row["block"]]
        want = sorted(
            g * 4 + i for g in range(4) for i in scores[g * 4 : g * 4 + 4].argsort(descending=True)[:2].tolist()
        )
        assert row["kept"] == want
    assert model.config.n_routed_experts == 8 and _experts(model) == 8
    save_model(model, tmp_path / "pruned")
    ids = torch.randint(4, 128, (2, 16))
    with torch.no_grad():
        native = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
        torch.testing.assert_close(native(ids).logits, model(ids).logits)
    biases = [m.e_score_correction_bias for m in native.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(b.shape == (8,) for b in biases)


def test_kept_experts_per_group():
    scores = torch.tensor([5.0, 1, 3, 2, 0, 9, 8, 7])
    assert kept_experts(scores, 4) == [0, 5, 6, 7]  # the best four overall
    assert kept_experts(scores, 4, groups=2) == [0, 2, 5, 6]  # the best two of each half
