"""The subset and slim forms: semantics against a token-by-token reference, neuron selection,
accounting, save/load and bad input.

The semantics relied on: main experts (the k - n_ce heaviest) run in full; each auxiliary expert
runs through a small gated MLP of r neurons (subset: its own first r neurons; slim: its trainable
copy), and every expert's output is weighted by its routing weight as the router gave it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import E, H, I, K, PlainExperts, assert_same_logits, compressed_layers, reference, routing

import compressed_experts as ce
import compressed_experts.backends.products as products
from compressed_experts import CompressedExperts
from compressed_experts.forms.subset import first_neurons
from compressed_experts.neurons import ActivationImportance, select_neurons, weight_importance


def reference_neuron_form(x, gate_up, down, act, index, weights, n_ce, aux_gate_up, aux_down):
    """The subset/slim semantics token by token in float64: main experts in full, each auxiliary
    expert through its own small MLP (``aux_gate_up`` ``[E, 2r, H]``, ``aux_down`` ``[E, H, r]``),
    every expert weighted by its raw routing weight."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, e = weights[t].double(), index[t].tolist()
        order = sorted(range(len(e)), key=lambda j: -w[j].item())
        for rank, j in enumerate(order):
            up_w, down_w = (gate_up, down) if rank < len(e) - n_ce else (aux_gate_up, aux_down)
            up_w, down_w = up_w[e[j]].double(), down_w[e[j]].double()
            gate, up = (up_w @ x[t]).chunk(2)
            out[t] = out[t] + w[j] * (down_w @ (act(gate) * up))
    return out


def subset_as_mlp(module):
    """The first r neurons of every expert as a stand-alone [E, 2r, H] / [E, H, r] MLP (a copy)."""
    gate, up, down = first_neurons(module)
    return torch.cat([gate, up], dim=1).detach().clone(), down.detach().clone()


def neuron_layer(form, n_ce, r, seed=0):
    module = CompressedExperts(PlainExperts(seed), n_ce, form, r)
    if form == "slim":  # move the MLPs away from their copy of the first r neurons
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in (module.ce_gate_up_proj, module.ce_down_proj):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def aux_weights(module):
    return subset_as_mlp(module) if module.form == "subset" else (module.ce_gate_up_proj, module.ce_down_proj)


@pytest.mark.parametrize("form", ["subset", "slim"])
@pytest.mark.parametrize("path", ["eager", "loop", "grouped"])
@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_matches_reference_on_every_path(form, path, tokens):
    if path == "grouped" and not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    module = neuron_layer(form, n_ce=2, r=4)  # 4 float32 neurons: rows 16-byte aligned, as grouped_mm wants
    module.path = path
    x = torch.randn(tokens, H)
    index, weights = routing(tokens, skip=(1, 6))  # experts 1 and 6 get no token
    expected = reference_neuron_form(
        x, module.gate_up_proj, module.down_proj, module.act_fn, index, weights, 2, *aux_weights(module)
    )
    torch.testing.assert_close(module(x, index, weights).double(), expected, rtol=1e-5, atol=1e-6)
    # The library's own reference, which every other test checks against, says the same.
    torch.testing.assert_close(reference(module, x, index, weights), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:compressed experts held in")  # gradients in 16 bits: a numerics check
@pytest.mark.parametrize("form", ["subset", "slim"])
def test_bfloat16_within_tolerance(form):
    torch.manual_seed(0)  # unseeded, one draw in many put an element 0.025 off (bfloat16 sums of H products)
    module = neuron_layer(form, n_ce=1, r=8)
    x = torch.randn(64, H)
    index, weights = routing(64)
    expected = module(x, index, weights)
    low = copy.deepcopy(module).to(torch.bfloat16)
    torch.testing.assert_close(low(x.bfloat16(), index, weights).float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.filterwarnings("ignore:compressed experts held in")  # gradients in 16 bits: a numerics check
def test_slim_with_float32_master_copies_runs_in_bfloat16():
    """--precision bf16 keeps compressed-expert parameters in float32; the layer casts them per call."""
    module = neuron_layer("slim", n_ce=2, r=8).to(torch.bfloat16)
    x = torch.randn(32, H).bfloat16()
    index, weights = routing(32)
    expected = module(x, index, weights)
    for p in (module.ce_gate_up_proj, module.ce_down_proj):
        p.data = p.data.float()
    out = module(x, index, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_subset_in_training_computes_what_it_computes_at_inference():
    """With trainable expert weights, subset masks neurons instead of slicing weights: same output."""
    module = neuron_layer("subset", n_ce=3, r=5)
    x = torch.randn(60, H)
    index, weights = routing(60, skip=(4,))
    with torch.no_grad():
        sliced = module(x, index, weights)
    masked = module(x, index, weights)
    assert masked.grad_fn is not None
    torch.testing.assert_close(masked.detach(), sliced, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["subset", "slim"])
def test_gradients_match_reference(form):
    module = neuron_layer(form, n_ce=2, r=6)
    x = torch.randn(40, H, requires_grad=True)
    index, weights = routing(40, skip=(3,))
    module(x, index, weights).square().sum().backward()
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.grad = None
    x_ref = x.detach().clone().requires_grad_(True)
    # The reference reads the subset's neurons straight from the main weights (views, not copies),
    # so their gradients add up exactly as in the layer.
    aux = (
        (torch.cat(first_neurons(twin)[:2], dim=1), first_neurons(twin)[2])
        if form == "subset"
        else (twin.ce_gate_up_proj, twin.ce_down_proj)
    )
    reference_neuron_form(
        x_ref, twin.gate_up_proj, twin.down_proj, twin.act_fn, index, weights, 2, *aux
    ).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", ["subset", "slim"])
def test_all_neurons_give_back_full_top_k(form):
    module = CompressedExperts(PlainExperts(), 3, form, r=I)
    x = torch.randn(30, H)
    index, weights = routing(30)
    torch.testing.assert_close(module(x, index, weights), module.full(x, index, weights), rtol=1e-5, atol=1e-6)


def test_selection_keeps_full_experts_and_puts_the_important_neurons_first():
    module = CompressedExperts(PlainExperts(), 2, "slim", r=4)
    x = torch.randn(50, H)
    index, weights = routing(50)
    before = module.full(x, index, weights)
    importance = torch.rand(E, I, generator=torch.Generator().manual_seed(3))
    original_down = module.down_proj.detach().clone()
    select_neurons(module, importance)
    torch.testing.assert_close(module.full(x, index, weights), before, rtol=1e-5, atol=1e-6)
    top = importance.topk(4, dim=1).indices  # the 4 most important neurons, most important first
    for e in range(E):
        assert torch.equal(module.down_proj[e, :, :4], original_down[e][:, top[e]])
    gate_up, down = subset_as_mlp(module)
    assert torch.equal(module.ce_gate_up_proj, gate_up) and torch.equal(module.ce_down_proj, down)


def test_activation_importance_matches_a_direct_count():
    module = CompressedExperts(PlainExperts(), 2, "subset", r=4)
    x = torch.randn(20, H)
    index, weights = routing(20, skip=(0,))
    stats = ActivationImportance(module)
    stats.update(x[:9], index[:9], weights[:9])  # in two batches: sums must add up
    stats.update(x[9:], index[9:], weights[9:])
    expected = torch.zeros(E, I, dtype=torch.float64)
    gate_up, down = module.gate_up_proj.double(), module.down_proj.double()
    for t in range(20):
        order = weights[t].argsort(descending=True)
        for j in order[K - 2 :].tolist():  # the two auxiliary experts of this token
            e = index[t, j].item()
            gate, up = (gate_up[e] @ x[t].double()).chunk(2)
            expected[e] += weights[t, j].double() * (torch.nn.functional.silu(gate) * up).abs()
    expected *= down.norm(dim=1)
    result = stats.result()
    aux = set(index.gather(-1, weights.argsort(-1, descending=True))[:, K - 2 :].flatten().tolist())
    for e in range(E):
        want = expected[e] if e in aux else weight_importance(module)[e].double()
        torch.testing.assert_close(result[e].double(), want, rtol=1e-5, atol=1e-7)


def test_convert_selects_by_weights_and_accounts_the_real_cost():
    model = ce.tiny_model("olmoe")
    plain = copy.deepcopy(model)
    ids = torch.randint(4, 100, (2, 10))
    top_k, inter = model.config.num_experts_per_tok, model.config.intermediate_size
    for form in ("subset", "slim"):
        converted = ce.convert(copy.deepcopy(plain), ce.CEConfig(2, form, r=4))
        assert ce.ce_config_of(converted) == ce.CEConfig(2, form, r=4)
        layer = compressed_layers(converted)[0]
        assert (
            weight_importance(layer)[:, :4]
            .min(dim=1)
            .values.ge(weight_importance(layer)[:, 4:].max(dim=1).values)
            .all()
        )
        full_twin = copy.deepcopy(converted)
        for each in compressed_layers(full_twin):
            each.n_ce = 0  # the reordering leaves the full model's output as it was
        with torch.no_grad():
            torch.testing.assert_close(full_twin(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        counts = ce.active_parameters(converted)
        assert counts["expert_equivalents"] == pytest.approx(top_k - 2 + 2 * 4 / inter)
        blocks = len(compressed_layers(converted))
        assert counts["compressed_experts"] == blocks * 2 * 3 * model.config.hidden_size * 4
        extra = blocks * layer.num_experts * 3 * model.config.hidden_size * 4 if form == "slim" else 0
        assert counts["added"] == extra and counts["total"] == ce.active_parameters(plain)["total"] + extra
    default = ce.convert(copy.deepcopy(plain), ce.CEConfig(2, "subset"))
    assert ce.ce_config_of(default).r == inter // 8


@pytest.mark.parametrize("form", ["subset", "slim"])
def test_save_and_load_round_trip(tmp_path, form):
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, form, r=3))
    if form == "slim":
        with torch.no_grad():
            for layer in compressed_layers(model):
                layer.ce_down_proj.mul_(1.5)
    model.save_pretrained(tmp_path / "m")
    loaded = ce.from_pretrained(tmp_path / "m")
    assert ce.ce_config_of(loaded) == ce.CEConfig(2, form, r=3)
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        assert_same_logits(loaded(ids).logits, model(ids).logits)
    assert ce.from_pretrained(tmp_path / "m", form=form, r=3) is not None  # repeating what it holds is fine
    with pytest.raises(ce.CompressedExpertsError, match="r=3; got r=5"):
        ce.from_pretrained(tmp_path / "m", r=5)


def test_slim_file_round_trip_and_subset_has_nothing_to_save(tmp_path):
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "slim", r=3))
    with torch.no_grad():
        for layer in compressed_layers(model):
            layer.ce_gate_up_proj.mul_(0.5)
    ce.save_compressed_experts(model, tmp_path / "slim.safetensors")
    applied = ce.apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "slim.safetensors")
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    subset = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "subset"))
    with pytest.raises(ce.CompressedExpertsError, match="form subset adds no parameters"):
        ce.save_compressed_experts(subset, tmp_path / "subset.safetensors")


def test_checkpoint_whose_r_disagrees_with_its_weights_is_refused(tmp_path):
    import json

    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "slim", r=3))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["compressed_experts"]["r"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ce.CheckpointError, match=r"ce_down_proj has shape \[64, 32, 3\] .* implies \[64, 32, 5\]"):
        ce.from_pretrained(tmp_path / "m")
    config["compressed_experts"]["form"] = "ia3"
    del config["compressed_experts"]["r"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ce.CheckpointError, match="holds compressed experts of form slim .* describes another form"):
        ce.from_pretrained(tmp_path / "m")


def test_bad_forms_and_neuron_counts_are_refused_early():
    with pytest.raises(ce.CompressedExpertsError, match="choose from ia3, none, subset, slim"):
        ce.CEConfig(2, "lora")
    with pytest.raises(ce.CompressedExpertsError, match="form ia3 has none"):
        ce.CEConfig(2, "ia3", r=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ce.CompressedExpertsError, match="r must be a whole number"):
            ce.CEConfig(2, "subset", r=bad)
    model = ce.tiny_model("olmoe")
    inter = model.config.intermediate_size
    with pytest.raises(ce.CompressedExpertsError, match=f"use r between 1 and {inter}"):
        ce.convert(model, ce.CEConfig(2, "slim", r=inter + 1))
    assert not compressed_layers(model)  # refused before any block was swapped
    with pytest.raises(ce.CompressedExpertsError, match="r=4 needs n_ce"):
        ce.from_pretrained("tiny:olmoe", r=4)


@pytest.mark.parametrize("form", ["subset", "slim"])
def test_generate_with_the_cache_matches_full_recomputation(form):
    """Decode-sized calls (one token, the loop path on CPU) give what the whole sequence gives."""
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(3, form, r=4)).eval()
    prompt = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generated = model.generate(
            prompt,
            max_new_tokens=8,
            do_sample=False,
            use_cache=True,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=0,
        )
        logits = model(generated).logits
    # Greedy: every generated token is the argmax of the full recomputation at the step before it.
    torch.testing.assert_close(generated[:, 6:], logits[:, 5:-1].argmax(-1), rtol=0, atol=0)


def test_auto_keeps_aligned_runs_on_grouped_mm_when_another_run_cannot_take_it(monkeypatch):
    if not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    module = neuron_layer("slim", n_ce=2, r=3)  # 3 float32 neurons: 12-byte rows, which grouped_mm refuses
    x = torch.randn(64, H)
    index, weights = routing(64)
    calls = []
    real = products.F.grouped_mm
    monkeypatch.setattr(products.F, "grouped_mm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    with torch.no_grad():
        out = module(x, index, weights)
    # The main experts' two products on grouped_mm ([E, H, 2I] and [E, I, H]); the slim MLPs loop.
    assert calls == [(E, H, 2 * I), (E, I, H)]
    torch.testing.assert_close(out.double(), reference(module, x, index, weights), rtol=1e-5, atol=1e-6)
    module.path = "grouped"  # forced: every run on grouped_mm, or a clear refusal
    with pytest.raises(ce.CompressedExpertsError, match="grouped path cannot run here: grouped_mm cannot take"):
        module(x, index, weights)
