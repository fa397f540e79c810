"""Per-token rules for the number of main experts (issue 18): ``top_p`` and ``skip_below``.

The semantics relied on, for one token whose routed experts are ordered by weight (ties keep the
router's order): under ``top_p`` a slot is main when the slots before it hold less than ``top_p``
of the token's routed weight (the sum of its k weights); under ``skip_below`` when its weight is at
least ``skip_below`` times the token's top weight; the heaviest slot is always main. The other
slots are auxiliary and go to the form as with a fixed ``n_ce``: ia3 averages their vectors with
their weights renormalised over the token's auxiliary set (none: scales of 1), none drops them,
subset and slim run their small MLPs on them. The reference here is written out token by token,
independently of the library.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    FAMILY_NAMES,
    FAST,
    E,
    H,
    I,
    K,
    PlainExperts,
    assert_same_logits,
    compressed_layers,
    randomise_compressed_experts,
    tokens,
    write_arithmetic,
)
from typer.testing import CliRunner

import compressed_experts as ce
import compressed_experts.backends.products as products
import compressed_experts.config as ce_config
from compressed_experts import CompressedExperts
from compressed_experts.cli import app
from compressed_experts.evaluation import model_summary
from compressed_experts.evaluation.report import compare, method_label, save_results
from compressed_experts.training import TrainConfig, train

RULES = [{"top_p": 0.9}, {"skip_below": 0.5}]
FORMS = [("ia3", None), ("none", None), ("subset", 8), ("slim", 8)]  # r = 8: rows grouped_mm takes in bf16 too
PATHS = ["eager", "loop", "grouped"]
needs_grouped_mm = pytest.mark.skipif(not products.HAS_GROUPED_MM, reason="this torch build has no grouped_mm")


def rule_id(rule):
    return ",".join(f"{k}={v}" for k, v in rule.items())


def main_count(weights: list[float], top_p=None, skip_below=None) -> int:
    """How many of a token's slots are main, from its weights sorted heaviest first (plain Python)."""
    if top_p is not None:
        total, held, count = sum(weights), 0.0, 0
        for w in weights:
            if count and held >= top_p * total:
                break
            count, held = count + 1, held + w
        return count
    return max(1, sum(1 for w in weights if w >= skip_below * weights[0]))


def mixed_routing(tokens: int, seed: int = 0):
    """Top-K routing of every concentration, renormalised (rows sum to 1), unsorted: from one dominant
    expert (one main expert under both rules) to nearly flat weights (all K main), and between."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    sharpness = torch.linspace(0.0, 3.0, tokens).unsqueeze(-1)
    weights = (torch.randn(tokens, K, generator=g) * sharpness).softmax(-1)
    weights[0] = torch.tensor([0.22, 0.28, 0.24, 0.26])  # nearly flat: K main
    weights[1] = torch.tensor([0.03, 0.91, 0.04, 0.02])  # one dominant expert: 1 main
    return index, weights


def check_counts(weights, rule) -> list[int]:
    """The main experts of each token by hand, asserting no token sits on a boundary (where float32
    rounding could decide) and that both extremes, 1 and K, occur."""
    counts = []
    for row in weights.tolist():
        ordered = sorted(row, reverse=True)
        counts.append(main_count(ordered, **rule))
        if "top_p" in rule:
            prefixes = [sum(ordered[:j]) for j in range(1, K)]
            assert all(abs(p - rule["top_p"] * sum(ordered)) > 1e-5 for p in prefixes)
        else:
            assert all(abs(w - rule["skip_below"] * ordered[0]) > 1e-5 for w in ordered[1:])
    assert 1 in counts and K in counts and any(1 < c < K for c in counts)
    return counts


def dynamic_layer(form, r, rule, seed=0):
    module = CompressedExperts(PlainExperts(seed), None, form, r, **rule)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random vectors and MLPs: more than the 1.0 / copied start
        if form == "ia3":
            for vec in (module.ce_gate, module.ce_up, module.ce_down):
                vec.copy_(torch.empty(vec.shape).uniform_(0.3, 1.7, generator=g))
        if form == "slim":
            for p in (module.ce_gate_up_proj, module.ce_down_proj):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def by_hand(module, x, index, weights, counts):
    """The method token by token in float64, with ``counts[t]`` main experts for token ``t``."""
    x, gate_up, down = x.double(), module.gate_up_proj.double(), module.down_proj.double()
    act, r = module.act_fn, module.r

    def mlp(gate_up_w, down_w, gate_in, up_in, scale=1.0):
        n = gate_up_w.shape[0] // 2
        return down_w @ (act(gate_up_w[:n] @ gate_in) * (gate_up_w[n:] @ up_in) * scale)

    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, e = weights[t].double(), index[t].tolist()
        order = sorted(range(K), key=lambda j: -w[j].item())
        main, aux = order[: counts[t]], order[counts[t] :]
        g = u = d = 1.0
        if module.form == "ia3" and aux:
            share = {j: w[j] / sum(w[i] for i in aux) for j in aux}
            g, u, d = (
                sum(share[j] * v[e[j]].double() for j in aux) for v in (module.ce_gate, module.ce_up, module.ce_down)
            )
        for j in main:
            out[t] += w[j] * mlp(gate_up[e[j]], down[e[j]], x[t] * g, x[t] * u, d)
        for j in aux:
            if module.form == "subset":
                small = torch.cat([gate_up[e[j], :r], gate_up[e[j], I : I + r]]), down[e[j], :, :r]
            elif module.form == "slim":
                small = module.ce_gate_up_proj[e[j]].double(), module.ce_down_proj[e[j]].double()
            else:
                continue  # ia3 and none: an auxiliary expert runs nothing of its own
            out[t] += w[j] * mlp(*small, x[t], x[t])
    return out


@needs_grouped_mm
@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("form, r", FORMS)
def test_every_backend_computes_the_rule_token_by_token(form, r, rule):
    module = dynamic_layer(form, r, rule)
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(5))
    index, weights = mixed_routing(40)
    expected = by_hand(module, x, index, weights, check_counts(weights, rule))
    for path in PATHS:
        module.path = path
        for grad in (False, True):  # subset masks neurons instead of slicing weights when they train
            with torch.set_grad_enabled(grad):
                out = module(x, index, weights)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6, msg=f"{path}, grad {grad}")


REAL_GROUPED_MM = getattr(products.F, "grouped_mm", None)


class PoisonedGroupedMM(torch.autograd.Function):
    """grouped_mm whose rows past the last expert's block hold NaN, forward and in the input's gradient:
    what uninitialised memory may hold (on CPU it holds whatever was there)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        out = REAL_GROUPED_MM(a, b, offs=offs).clone()
        out[offs[-1] :] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            grad_a, grad_b = torch.autograd.grad(REAL_GROUPED_MM(a_, b_, offs=offs), (a_, b_), grad)
        grad_a = grad_a.clone()
        grad_a[offs[-1] :] = float("nan")
        return grad_a, grad_b, None


def grads_of(module, x, index, weights, probe):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = module(x, index, weights)
    (out.float() * probe).sum().backward()
    named = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), {"x": x.grad, "routing weights": weights.grad, **named}


@needs_grouped_mm
@pytest.mark.filterwarnings("ignore:compressed experts held in")  # gradients in 16 bits: a numerics check
@pytest.mark.parametrize(
    "rule, dtype",
    [(RULES[0], torch.float32), (RULES[1], torch.float32), (RULES[0], torch.bfloat16)],  # bf16: one rule will do
    ids=["top_p-float32", "skip_below-float32", "top_p-bfloat16"],
)
@pytest.mark.parametrize("form, r", FORMS)
def test_gradients_agree_between_backends_with_skipped_rows_poisoned(monkeypatch, form, r, rule, dtype):
    module = dynamic_layer(form, r, rule).to(dtype)
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    index, weights = mixed_routing(33, seed=3)
    weights = weights.to(dtype)
    probe = torch.randn(33, H, generator=torch.Generator().manual_seed(4))
    runs = {}
    for path in PATHS if dtype == torch.float32 else PATHS[1:]:  # bf16: checked against the loop
        module.path = path
        runs[path] = grads_of(module, x, index, weights, probe)
    monkeypatch.setattr(products.F, "grouped_mm", lambda a, b, offs: PoisonedGroupedMM.apply(a, b, offs))
    module.path = "grouped"
    runs["poisoned"] = grads_of(module, x, index, weights, probe)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for path in ("loop", "grouped", "poisoned"):
        out, grads = runs[path]
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values()), path
        reference = "eager" if dtype == torch.float32 else "loop"  # bf16: the fast paths round alike
        want_out, want = runs[reference]
        torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol, msg=path)
        assert grads.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(
                grads[name].float(), want[name].float(), rtol=tol, atol=tol, msg=f"{path}: {name}"
            )
    assert torch.equal(runs["poisoned"][0], runs["grouped"][0])  # exactly: skipped rows add exact zeros


@needs_grouped_mm
@pytest.mark.parametrize("form, r", FORMS)
def test_the_grouped_path_makes_no_host_sync(monkeypatch, form, r):
    """No .item()/.tolist()/bool()/nonzero() on the grouped path, forward and (frozen experts, trained
    compressed experts: the CPU weight-gradient loop, which does sync, is not on it) backward."""
    module = dynamic_layer(form, r, {"top_p": 0.7})
    module.path = "grouped"
    module.gate_up_proj.requires_grad_(False)
    module.down_proj.requires_grad_(False)
    x = torch.randn(24, H)
    index, weights = mixed_routing(24)
    synced = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: synced.append(_n) or _r(self, *a, **k)
        )
    monkeypatch.setattr(
        torch, "nonzero", lambda *a, **k: synced.append("torch.nonzero") or torch.Tensor.nonzero(*a, **k)
    )
    out = module(x, index, weights)
    if form in ("ia3", "slim"):
        out.square().sum().backward()
    monkeypatch.undo()
    assert synced == []
    if form in ("ia3", "slim"):
        assert all(p.grad is not None for n, p in module.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_top_p_one_is_full_top_k_on_every_router(family):
    """top_p = 1 keeps every routed expert, whether or not the family renormalises its top-k weights."""
    model = ce.from_pretrained(f"tiny:{family}", top_p=1.0).eval()
    randomise_compressed_experts(model)  # any auxiliary expert would change the output
    full = copy.deepcopy(model)
    for layer in compressed_layers(full):
        layer.n_ce, layer.top_p = 0, None
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, full(tokens()).logits, rtol=0, atol=1e-5)


def test_a_layer_at_top_p_one_is_the_full_block():
    module = dynamic_layer("ia3", None, {"top_p": 1.0})
    x = torch.randn(30, H)
    index, weights = mixed_routing(30)  # renormalised: each row sums to 1
    for path in PATHS:
        module.path = path
        torch.testing.assert_close(module(x, index, weights), module.full(x, index, weights), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form, r", FORMS)
def test_a_skip_ratio_reproduces_a_fixed_n_ce_when_the_weights_make_it_so(form, r):
    """Every token has two experts above half its top weight and two below: skip_below=0.5 is n_ce=2."""
    g = torch.Generator().manual_seed(9)
    tokens_ = 25
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens_)])
    heavy = torch.rand(tokens_, 2, generator=g) * 0.2 + 0.8  # 0.8..1.0: both >= 0.5 of the top
    light = torch.rand(tokens_, 2, generator=g) * 0.3 + 0.05  # 0.05..0.35: both < 0.4
    raw = torch.cat([heavy, light], dim=-1)
    order = torch.stack([torch.randperm(K, generator=g) for _ in range(tokens_)])  # unsorted, as routers give
    weights = raw.gather(-1, order)
    weights = weights / weights.sum(-1, keepdim=True)
    dynamic = dynamic_layer(form, r, {"skip_below": 0.5})
    fixed = CompressedExperts(PlainExperts(), 2, form, r)
    fixed.load_state_dict(dynamic.state_dict())
    x = torch.randn(tokens_, H)
    for path in PATHS:
        dynamic.path = fixed.path = path
        torch.testing.assert_close(dynamic(x, index, weights), fixed(x, index, weights), rtol=1e-6, atol=1e-6)


def test_the_fixed_path_is_unchanged():
    """A fixed n_ce hands no mask to the backends: the split and the runs are what they always were."""
    module = CompressedExperts(PlainExperts(), 2, "subset", 4)
    index, weights = mixed_routing(6)
    with torch.no_grad():
        runs = module.form_spec.runs(module, ce.routing.split_routing(index, weights, 2))
    assert all(run.skip is None for run in runs) and [run.index.shape for run in runs] == [(6, 2), (6, 2)]


def test_save_and_load_round_trip_and_older_libraries_refuse(tmp_path, monkeypatch):
    model = ce.from_pretrained("tiny:olmoe", skip_below=0.3, form="slim", r=4)
    model.save_pretrained(tmp_path / "dyn")
    section = json.loads((tmp_path / "dyn" / "config.json").read_text())["compressed_experts"]
    assert section["skip_below"] == 0.3 and "n_ce" not in section and section["format_version"] == 2
    loaded = ce.from_pretrained(tmp_path / "dyn")
    assert ce.ce_config_of(loaded) == ce.CEConfig(skip_below=0.3, form="slim", r=4)
    with torch.no_grad():
        assert_same_logits(loaded(tokens()).logits, model(tokens()).logits)
    assert ce.from_pretrained(tmp_path / "dyn", skip_below=0.3) is not None  # repeating it is fine
    with pytest.raises(ce.CompressedExpertsError, match="already has compressed experts with skip_below=0.3"):
        ce.from_pretrained(tmp_path / "dyn", top_p=0.5)
    # A fixed n_ce is still written as format 1, which every version of the library reads.
    ce.from_pretrained("tiny:olmoe", n_ce=2).save_pretrained(tmp_path / "fixed")
    fixed = json.loads((tmp_path / "fixed" / "config.json").read_text())["compressed_experts"]
    assert fixed["format_version"] == 1 and fixed["n_ce"] == 2 and "top_p" not in fixed
    monkeypatch.setattr(ce_config, "FORMAT_VERSION", 1)  # a library from before the per-token rules
    assert ce.from_pretrained(tmp_path / "fixed") is not None
    with pytest.raises(ce.CompressedExpertsError, match="newer than this library's.*upgrade"):
        ce.from_pretrained(tmp_path / "dyn")


def test_compressed_experts_file_round_trip(tmp_path):
    model = ce.from_pretrained("tiny:olmoe", top_p=0.6)
    randomise_compressed_experts(model)
    ce.save_compressed_experts(model, tmp_path / "ce.safetensors")
    applied = ce.apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "ce.safetensors")
    assert ce.ce_config_of(applied) == ce.CEConfig(top_p=0.6)
    with torch.no_grad():
        assert_same_logits(applied(tokens()).logits, model(tokens()).logits)


BAD = [
    ({"top_p": 0}, "top_p"),
    ({"top_p": -0.2}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": float("inf")}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"top_p": "0.5"}, "top_p"),
    ({"skip_below": 0}, "skip_below"),
    ({"skip_below": 1}, "skip_below"),
    ({"skip_below": 1.5}, "skip_below"),
    ({"skip_below": float("nan")}, "skip_below"),
]


@pytest.mark.parametrize("rule, name", BAD, ids=[rule_id(rule) for rule, _ in BAD])
def test_a_rule_out_of_range_is_one_clear_error(rule, name):
    wanted = r"in \(0, 1\]" if name == "top_p" else r"in \(0, 1\)"
    with pytest.raises(ce.CompressedExpertsError, match=wanted) as err:
        ce.CEConfig(**rule)
    assert err.value.settings == (name,)
    with pytest.raises(ce.CompressedExpertsError, match=wanted):
        ce.from_pretrained("tiny:olmoe", **rule)
    with pytest.raises(ce.CompressedExpertsError, match=name):
        TrainConfig(model="tiny:olmoe", data="d.jsonl", out="o", **rule)


def test_exactly_one_rule(tmp_path):
    for rules in ({"n_ce": 2, "top_p": 0.5}, {"top_p": 0.5, "skip_below": 0.2}, {}):
        with pytest.raises(ce.CompressedExpertsError, match="give exactly one of n_ce .*, top_p or skip_below"):
            ce.CEConfig(**rules)
    with pytest.raises(ce.CompressedExpertsError, match="method full runs all top-k experts; top_p=0.5"):
        TrainConfig(model="tiny:olmoe", data="d.jsonl", out="o", method="full", top_p=0.5)
    runner = CliRunner()
    for args, message in (
        (["--top-p", "1.5"], "error: --top-p is the share"),
        (["--top-p", "0.5", "--n-ce", "2"], "error: give exactly one of --n-ce"),
        ([], "--top-p or --skip-below"),
    ):
        result = runner.invoke(app, ["convert", "tiny:olmoe", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "out").exists()  # refused before any work


def test_convert_and_info_on_the_command_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "dyn"
    result = runner.invoke(app, ["convert", "tiny:olmoe", "--top-p", "0.6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ce.ce_config_of(ce.from_pretrained(out)) == ce.CEConfig(top_p=0.6)
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "top_p=0.6" in result.output and "info --text" in result.output
    (tmp_path / "text.txt").write_text("Compressed experts keep the heaviest routed experts in full. " * 40)
    args = ["info", str(out), "--text", str(tmp_path / "text.txt"), "--tokens", "256", "--seq-len", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "(measured)" in result.output and "active saving" in result.output


def routing_of(model, ids):
    """Each block's top-k weights on ``ids``, as the block hands them to its experts."""
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, _l=layer: seen.__setitem__(_l, args[2].detach()))
        for layer in compressed_layers(model)
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("rule", RULES + [{"top_p": 0.5}], ids=rule_id)
def test_active_parameters_are_the_measured_average(rule):
    model = ce.from_pretrained("tiny:qwen2_moe", **rule)  # shared experts and a router that does not renormalise
    with pytest.raises(ce.CompressedExpertsError, match="depend on the text: give input_ids"):
        ce.active_parameters(model)
    ids = tokens(3, 11)
    k, hidden, inter = model.config.num_experts_per_tok, model.config.hidden_size, model.config.moe_intermediate_size
    mains = []
    for weights in routing_of(model, ids).values():
        counts = [main_count(sorted(row, reverse=True), **rule) for row in weights.tolist()]
        mains.append(sum(counts) / len(counts))
    counts = ce.active_parameters(model, input_ids=ids)
    assert counts["main_experts_per_token"] == pytest.approx(sum(mains) / len(mains))
    per_expert = 3 * hidden * inter
    assert counts["main_experts"] == round(sum(m * per_expert for m in mains))
    assert counts["compressed_experts"] == round(sum((k - m) * (2 * hidden + inter) for m in mains))
    fixed = ce.active_parameters(ce.from_pretrained("tiny:qwen2_moe", n_ce=1))
    others = lambda c: c["active"] - c["main_experts"] - c["compressed_experts"]  # noqa: E731
    assert others(counts) == others(fixed) and counts["active_full_topk"] == fixed["active_full_topk"]
    # Padding is not counted; sequences given as lists of ids of any lengths are padded for the caller.
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ragged = [ids[0].tolist(), ids[1, :5].tolist(), ids[2].tolist()]
    assert ce.active_parameters(model, ids, attention_mask=mask) == ce.active_parameters(model, ragged)


def test_evaluation_summary_measures_on_what_it_read():
    model = ce.from_pretrained("tiny:olmoe", top_p=0.6, form="none")
    tokenizer = ce.tiny_tokenizer()
    texts = ["What is 2 + 3? 5", "Name a colour. Blue"]
    summary = model_summary(model, "m", tokenizer, texts)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert (summary["method"], summary["n_ce"], summary["rule"]) == ("top-m", None, "top_p=0.6")
    assert summary["active_parameters"] == ce.active_parameters(model, ids)["active"]
    assert method_label(summary) == "top_p=0.6" and method_label({**summary, "method": "ce"}) == "top_p=0.6 + CE"
    with pytest.raises(ce.CompressedExpertsError, match="per token"):
        model_summary(model, "m")


def test_compare_places_a_rule_beside_fixed_ones(tmp_path):
    common = {"task": "gsm8k", "metric": "accuracy", "n": 10, "settings": {}, "examples": []}
    full = {"source": "m", "method": "full", "n_ce": 0, "top_k": 8, "active_parameters": 100}
    rule = {"source": "m", "method": "ce", "n_ce": None, "rule": "top_p=0.6", "top_k": 8, "active_parameters": 70}
    save_results({**common, "score": 0.5, "model": full}, tmp_path / "full.json")
    save_results({**common, "score": 0.4, "model": rule}, tmp_path / "rule.json")
    rows = compare([tmp_path / "full.json", tmp_path / "rule.json"])["rows"]
    assert [(row["label"], row["recovery"]) for row in rows] == [("full top-8", 1.0), ("top_p=0.6 + CE", 0.8)]
    save_results({**common, "score": 0.4, "model": {**rule, "rule": None}}, tmp_path / "bad.json")
    with pytest.raises(ce.CompressedExpertsError, match="model.n_ce is null, not a whole number"):
        compare([tmp_path / "bad.json"])


def test_training_keeps_the_checkpoints_rule():
    settings = dict(model="tiny:olmoe", data="d.jsonl", out="o")
    held = ce.CEConfig(top_p=0.6, form="slim", r=4)
    assert TrainConfig(**settings).ce_config(8, held) == held
    assert TrainConfig(**settings, method="top-m", skip_below=0.2).ce_config(8) == ce.CEConfig(
        skip_below=0.2, form="none"
    )


@pytest.mark.slow
def test_fine_tuning_under_a_rule_saves_it_and_measures_its_active_parameters(tmp_path):
    data = write_arithmetic(tmp_path / "data.jsonl", n=40)
    out = tmp_path / "run"
    config = TrainConfig(data=str(data), out=str(out), skip_below=0.4, trainable="ce", max_steps=2, **FAST)
    result = train(config)
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["rule"], summary["n_ce"]) == ("skip_below=0.4", None)
    assert 1 <= summary["main_experts_per_token"] < 8 and summary["active_parameters"] < summary["active_full_topk"]
    loaded = ce.from_pretrained(out)
    assert ce.ce_config_of(loaded) == ce.CEConfig(skip_below=0.4)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, result.model(tokens()).logits)


def test_fit_works_under_a_per_token_rule():
    model = ce.from_pretrained("tiny:olmoe", top_p=0.7, form="slim", r=4)
    blocks = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    report = ce.fit(model, blocks, steps=3, batch_tokens=64, progress=False)
    assert report["rule"] == "top_p=0.7" and len(report["blocks"]) == 2
    for row in report["blocks"]:
        assert row["relative_error_after"] <= row["relative_error_converted"]


@pytest.mark.compiles
def test_a_block_with_a_rule_compiles_whole():
    model = ce.from_pretrained("tiny:olmoe", skip_below=0.4).eval()
    randomise_compressed_experts(model)
    experts = compressed_layers(model)[0]
    block = next(m for m in model.modules() if getattr(m, "experts", None) is experts)
    compiled = torch.compile(block, fullgraph=True, backend="eager", dynamic=True)  # a graph break raises
    try:
        with torch.no_grad():
            for length in (1, 5):
                x = torch.randn(2, length, model.config.hidden_size)
                got, want = compiled(x), block(x)
                got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.compiles
def test_compiled_training_of_a_block_with_a_rule_gives_the_eager_gradients():
    model = ce.from_pretrained("tiny:olmoe", top_p=0.6)
    randomise_compressed_experts(model)
    experts = compressed_layers(model)[0]
    block = next(m for m in model.modules() if getattr(m, "experts", None) is experts)
    x = torch.randn(2, 7, model.config.hidden_size)

    def gradients(forward):
        block.zero_grad()
        out = forward(x)
        (out[0] if isinstance(out, tuple) else out).square().sum().backward()
        return {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    expected = gradients(block)
    try:
        got = gradients(torch.compile(block, backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert got.keys() == expected.keys() and "experts.compressed.ce_gate" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_decode_kernels_decline_a_rule():
    module = dynamic_layer("ia3", None, {"top_p": 0.6})
    call = ce.routing.Call(module, torch.randn(2, H), *mixed_routing(2), None, 0.6)
    reason = ce.backends.BACKENDS["decode"].unavailable(call)
    assert "per-token rule" in reason or "gradients are on" in reason
    with torch.no_grad():
        assert "per-token rule" in ce.backends.BACKENDS["decode"].unavailable(call)
