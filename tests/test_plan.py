"""The planner: its allocation against brute force, its divergences against an independent KL, and bad input."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

import compressed_experts as ce
from compressed_experts.plan import PlanConfig, allocate, check_plan_fits, frontier_plot, plan, read_plan


def test_allocation_is_the_best_choice_within_the_capacity():
    rng = random.Random(0)
    for _ in range(200):
        groups = rng.randint(1, 4)
        values = [[rng.random() for _ in range(rng.randint(1, 4))] for _ in range(groups)]
        costs = [[rng.randint(0, 6) for _ in group] for group in values]
        capacity = rng.randint(0, 15)
        fitting = [
            pick
            for pick in itertools.product(*(range(len(g)) for g in values))
            if sum(costs[g][i] for g, i in enumerate(pick)) <= capacity
        ]
        choice = allocate(values, costs, capacity)
        if not fitting:
            assert choice is None
            continue
        best = min(sum(values[g][i] for g, i in enumerate(pick)) for pick in fitting)
        assert sum(costs[g][i] for g, i in enumerate(choice)) <= capacity
        assert sum(values[g][i] for g, i in enumerate(choice)) == pytest.approx(best)


def _calibration(seed: int = 0, sequences: int = 8, length: int = 128) -> torch.Tensor:
    return torch.randint(4, 128, (sequences, length), generator=torch.Generator().manual_seed(seed))


def _kl(model_full, model_other, ids) -> float:
    """KL(full || other) per token, written out here rather than taken from the planner."""
    with torch.no_grad():
        p = F.log_softmax(model_full(ids).logits.float(), -1)
        q = F.log_softmax(model_other(ids).logits.float(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="sum")) / ids.numel()


@pytest.fixture(scope="module")
def planned():
    model = ce.tiny_model("olmoe")
    before = copy.deepcopy(model)
    calibration, heldout = _calibration(0), _calibration(1, sequences=4)
    result = plan(model, calibration, PlanConfig(budget="50%"), frontier=(2.5, 6), heldout=heldout)
    return model, before, calibration, heldout, result


def test_plan_meets_its_budget_and_measures_what_it_chose(planned):
    model, before, calibration, _, result = planned
    assert result.budget == 4.0  # 50% of top-8
    assert result.expert_equivalents <= 4.0 and len(result.layers) == 2
    for config, cost in zip(result.layers, result.layer_costs):
        share = config.r / 16 if config.form == "subset" else 0.0  # tiny OLMoE: I = 16
        assert cost == pytest.approx(8 - config.n_ce + config.n_ce * share)
    assert result.predicted_divergence == pytest.approx(sum(result.layer_divergences))
    # The whole planned model, converted block by block here, gives the divergence the plan measured.
    other = copy.deepcopy(before)
    for (_, block), config in zip(ce.architectures.moe_blocks(other, ce.architectures.family_of(other)), result.layers):
        block.experts = ce.CompressedExperts(block.experts, config.n_ce, config.form, config.r)
        if config.form == "subset":
            from compressed_experts.neurons import select_neurons, weight_importance

            select_neurons(block.experts, weight_importance(block.experts))
    assert result.measured_divergence == pytest.approx(_kl(before, other, calibration), rel=1e-4)
    # The best uniform setting is measured the same way: here by convert.
    uniform = ce.CEConfig.from_dict(result.uniform["setting"])
    converted = ce.convert(copy.deepcopy(before), uniform)
    assert result.uniform["measured_divergence"] == pytest.approx(_kl(before, converted, calibration), rel=1e-4)
    assert result.uniform["expert_equivalents"] <= 4.0
    # Planning left the model computing what it did.
    with torch.no_grad():
        torch.testing.assert_close(model(calibration).logits, before(calibration).logits)


def test_frontier_rows_and_plot(planned, tmp_path):
    _, before, _, heldout, result = planned
    with torch.no_grad():
        logits = before(heldout).logits[:, :-1]
    full = F.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].flatten())
    assert result.full_loss == pytest.approx(float(full), rel=1e-5)
    budgets = [row["budget"] for row in result.frontier]
    assert budgets == [2.5, 4.0, 6]
    for row in result.frontier:
        assert row["planned"] <= row["budget"] and row["uniform_expert_equivalents"] <= row["budget"]
        assert row["planned_loss"] > 0 and row["uniform_loss"] > 0
        layers = [ce.CEConfig.from_dict(layer) for layer in row["layers"]]  # the point's plan, applicable
        assert len(layers) == len(result.layers) and (row["budget"] != 4.0 or layers == result.layers)
    planned_divergence = [row["planned_divergence"] for row in result.frontier]
    assert planned_divergence == sorted(planned_divergence, reverse=True)  # more budget, closer to full top-k
    frontier_plot(result, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_plan_json_round_trip_and_fit_check(planned, tmp_path):
    model, _, _, _, result = planned
    result.save(tmp_path / "plan.json")
    read = read_plan(tmp_path / "plan.json")
    assert list(read["configs"]) == result.layers
    assert list(check_plan_fits(read, model)) == result.layers
    other = ce.tiny_model("mixtral")  # other block count and experts
    with pytest.raises(ce.CompressedExpertsError, match="plan this model"):
        check_plan_fits(read, other)
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "layers": []}))
    with pytest.raises(ce.CompressedExpertsError, match="not a plan"):
        read_plan(tmp_path / "bad.json")
    with pytest.raises(ce.CompressedExpertsError, match="no such plan"):
        read_plan(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"budget": "abc"}, "budget must be a number"),
        ({"budget": "0"}, "budget must be above 0"),
        ({"budget": "-2"}, "budget must be above 0"),
        ({"budget": "4", "forms": "lora"}, "unknown form 'lora'"),
        ({"budget": "4", "forms": ""}, "forms is empty"),
        ({"budget": "4", "r": "x"}, "r must be whole numbers"),
        ({"budget": "4", "r": "0"}, "r values must be 1 or more"),
        ({"budget": "4", "batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_settings_are_refused_when_built(settings, message):
    with pytest.raises(ce.CompressedExpertsError, match=message):
        PlanConfig(**settings)


@pytest.mark.parametrize(
    "settings, calibration, message",
    [
        ({"budget": "0.5"}, None, "below what any candidate reaches"),
        ({"budget": "9"}, None, "above full top-k"),
        ({"budget": "101%"}, None, "above full top-k"),
        ({"budget": "4", "r": "17"}, None, "more neurons than this model's experts have"),
        ({"budget": "4"}, _calibration(sequences=2), "calibration text too short"),
    ],
)
def test_bad_input_is_refused_before_any_forward(settings, calibration, message, monkeypatch):
    model = ce.tiny_model("olmoe")
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(ce.CompressedExpertsError, match=message):
        plan(model, _calibration() if calibration is None else calibration, PlanConfig(**settings))


def test_a_converted_model_is_refused():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    with pytest.raises(ce.CompressedExpertsError, match="plan a plain model"):
        plan(model, _calibration(), PlanConfig(budget="4"))


def test_plan_command_writes_the_plan_and_its_plot(tmp_path):
    from typer.testing import CliRunner

    from compressed_experts.cli import app

    text = tmp_path / "calib.txt"
    rng = random.Random(0)
    text.write_text(
        "\n\n".join(" ".join(rng.choice(["alpha", "beta", "7+5=12", "x"]) for _ in range(80)) for _ in range(60))
    )
    args = ["plan", "tiny:olmoe", "--calib", str(text), "--heldout", str(text), "--seq-len", "128", "--tokens", "1024"]
    args += ["--out", str(tmp_path / "plan.json"), "--frontier", "3", "--dtype", "float32", "--top-p", "0.5"]
    result = CliRunner().invoke(app, [*args, "--budget", "75%"])
    assert result.exit_code == 0, result.output
    written = read_plan(tmp_path / "plan.json")
    assert written["budget"] == 6.0 and written["expert_equivalents"] <= 6.0 and len(written["configs"]) == 2
    assert [row["budget"] for row in written["frontier"]] == [3.0, 6.0] and (tmp_path / "plan.png").is_file()
    assert "best uniform setting" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--budget", "0.5"])
    assert result.exit_code == 2 and "error: --budget 0.5 is below what any candidate reaches" in " ".join(
        result.output.split()
    )


# ---------------------------------------------------------------- settings per block: convert, save, load, fit


PER_BLOCK = (ce.CEConfig(2, "subset", 4), ce.CEConfig(5, "none"))  # tiny OLMoE: 2 blocks, top-8, I = 16


def test_per_block_settings_convert_each_block_as_its_own(tmp_path):
    model = ce.convert(ce.tiny_model("olmoe"), list(PER_BLOCK))
    layers = [m for m in model.modules() if isinstance(m, ce.CompressedExperts)]
    assert [(layer.n_ce, layer.form, layer.r) for layer in layers] == [(2, "subset", 4), (5, "none", None)]
    assert ce.ce_config_of(model) == PER_BLOCK
    # The same blocks built one by one by hand give the same logits.
    other = ce.tiny_model("olmoe")
    blocks = ce.architectures.moe_blocks(other, ce.architectures.family_of(other))
    for (_, block), config in zip(blocks, PER_BLOCK):
        block.experts = ce.CompressedExperts(block.experts, config.n_ce, config.form, config.r)
        if config.form == "subset":
            from compressed_experts.neurons import select_neurons, weight_importance

            select_neurons(block.experts, weight_importance(block.experts))
    ids = _calibration(sequences=2, length=32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits)
    # Equal settings collapse to one: a plan of one setting saves as a uniform conversion.
    uniform = ce.convert(ce.tiny_model("olmoe"), [ce.CEConfig(3), ce.CEConfig(3)])
    assert ce.ce_config_of(uniform) == ce.CEConfig(3) and uniform.config.compressed_experts["n_ce"] == 3


def test_per_block_settings_save_load_and_refuse_old_readers(tmp_path, monkeypatch):
    model = ce.convert(ce.tiny_model("olmoe"), list(PER_BLOCK))
    model.save_pretrained(tmp_path / "m")
    section = json.loads((tmp_path / "m" / "config.json").read_text())["compressed_experts"]
    assert section["format_version"] == 3 and [layer["n_ce"] for layer in section["layers"]] == [2, 5]
    loaded = ce.from_pretrained(tmp_path / "m")
    assert ce.ce_config_of(loaded) == PER_BLOCK
    ids = _calibration(sequences=2, length=32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ce.CompressedExpertsError, match="settings per MoE block .* got n_ce: leave them out"):
        ce.from_pretrained(tmp_path / "m", n_ce=2)
    from compressed_experts import config as ce_config

    monkeypatch.setattr(ce_config, "FORMAT_VERSION", 2)  # a library from before plans refuses, never misreads
    with pytest.raises(ce.CompressedExpertsError, match="format 3, newer than this library's"):
        ce.from_pretrained(tmp_path / "m")


def test_a_plan_file_converts_loads_and_fits(planned, tmp_path):
    model, _, calibration, _, result = planned
    result.save(tmp_path / "plan.json")
    converted = ce.from_pretrained("tiny:olmoe", plan=tmp_path / "plan.json")
    assert list(ce.ce_config_of(converted)) == result.layers
    shape = ce.checkpoint.skeleton("tiny:olmoe", plan=tmp_path / "plan.json")
    assert list(ce.ce_config_of(shape)) == result.layers
    assert ce.active_parameters(converted)["expert_equivalents"] == pytest.approx(result.expert_equivalents)
    with pytest.raises(ce.CompressedExpertsError, match="leave n_ce out"):
        ce.from_pretrained("tiny:olmoe", n_ce=2, plan=tmp_path / "plan.json")
    with pytest.raises(ce.CompressedExpertsError, match="plan this model"):
        ce.from_pretrained("tiny:mixtral", plan=tmp_path / "plan.json")
    # fit takes each block as its form says: subset blocks choose neurons, a none block is left alone.
    mixed = ce.convert(ce.tiny_model("olmoe"), [ce.CEConfig(4, "slim", 4), ce.CEConfig(4, "none")])
    report = ce.fit(mixed, calibration, steps=2, progress=False)
    assert [row["block"] for row in report["blocks"]] == [0] and report["rule"] == "per block (a plan)"


def test_plan_through_the_commands(planned, tmp_path):
    from typer.testing import CliRunner

    from compressed_experts.cli import app

    _, _, _, _, result = planned
    result.save(tmp_path / "plan.json")
    out = tmp_path / "converted"
    done = CliRunner().invoke(app, ["convert", "tiny:olmoe", "--plan", str(tmp_path / "plan.json"), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert list(ce.ce_config_of(ce.from_pretrained(out))) == result.layers
    refused = CliRunner().invoke(
        app,
        ["convert", "tiny:olmoe", "--plan", str(tmp_path / "plan.json"), "--n-ce", "2", "--out", str(tmp_path / "x")],
    )
    assert refused.exit_code == 2 and "leave --n-ce out" in " ".join(refused.output.split())
    missing = CliRunner().invoke(
        app, ["convert", "tiny:olmoe", "--plan", str(tmp_path / "no.json"), "--out", str(tmp_path / "y")]
    )
    assert missing.exit_code == 2 and "no such plan" in missing.output


def test_per_token_rules_are_candidates_costed_on_the_text():
    from compressed_experts.plan import _candidates, _Measure

    model = ce.tiny_model("olmoe")
    calibration = _calibration(0)
    # The top_p 0.4 candidate's cost in block 0, counted here from the routing the block sees.
    captured = []
    block = next(iter(ce.architectures.moe_blocks(model, ce.architectures.family_of(model))))[1]
    handle = block.experts.register_forward_hook(lambda m, args, out: captured.append(args[2].detach()))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    weights = captured[0].sort(dim=-1, descending=True).values
    share = weights.cumsum(-1) / weights.sum(-1, keepdim=True)
    mains = 1 + (share[:, :-1] < 0.4).sum(-1)  # the fewest heaviest covering 40% of the routed weight
    blocks = list(ce.architectures.moe_blocks(model, ce.architectures.family_of(model)))
    candidates = _candidates(blocks, 8, PlanConfig(budget="3", forms="none", top_p="0.4"))
    _Measure(model, blocks, calibration.split(8), False).cost_rules(candidates, 8)
    rule = next(c for c in candidates[0] if c.config.top_p == 0.4)
    assert rule.cost == pytest.approx(float(mains.float().mean()))
    # A plan with rules among its candidates stays within its budget.
    result = plan(model, calibration, PlanConfig(budget="3", forms="none", top_p="0.4,0.8"), frontier=())
    assert result.expert_equivalents <= 3.0
    with pytest.raises(ce.CompressedExpertsError, match="top_p"):
        PlanConfig(budget="3", top_p="1.5")
    with pytest.raises(ce.CompressedExpertsError, match="numbers separated by commas"):
        PlanConfig(budget="3", skip_below="x")
