"""The compressed-experts module on its own: semantics, gradients and every compute backend.

The semantics relied on: each token's routed experts ordered by weight (ties keep the router's
order), the first k - n_ce run in full with the router's weights as they are; the auxiliary
experts' vectors averaged with their weights renormalised to sum to one scale the main experts'
gate input, up input and down input."""

from __future__ import annotations

import pytest
import torch
from conftest import E, H, I, K, PlainExperts, reference, routing
from torch import nn

import compressed_experts as ce
import compressed_experts.backends.products as products
from compressed_experts import CompressedExperts


def layer(n_ce, seed=0):
    module = CompressedExperts(PlainExperts(seed), n_ce)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for vec in (module.ce_gate, module.ce_up, module.ce_down):
            vec.copy_(torch.empty(vec.shape).uniform_(0.3, 1.7, generator=g))
    return module


def method_by_hand(module, x, index, weights):
    """The method written out for one token at a time, in float64, independently of the library:
    the check that the library's own reference (the eager backend) states it right."""
    x, gate_up, down = x.double(), module.gate_up_proj.double(), module.down_proj.double()
    vectors = [v.double() for v in (module.ce_gate, module.ce_up, module.ce_down)]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, e = weights[t].double(), index[t].tolist()
        order = sorted(range(len(e)), key=lambda j: -w[j].item())
        main, aux = order[: len(e) - module.n_ce], order[len(e) - module.n_ce :]
        g, u, d = (sum(w[j] / sum(w[i] for i in aux) * v[e[j]] for j in aux) if aux else 1.0 for v in vectors)
        for j in main:
            gate = gate_up[e[j], :I] @ (x[t] * g)
            up = gate_up[e[j], I:] @ (x[t] * u)
            out[t] += w[j] * (down[e[j]] @ (module.act_fn(gate) * up * d))
    return out


@pytest.mark.parametrize("n_ce", [0, 1, 3])
def test_the_reference_is_the_method(n_ce):
    module = layer(n_ce)
    x = torch.randn(7, H)
    index, weights = routing(7, skip=(2,))
    torch.testing.assert_close(
        reference(module, x, index, weights), method_by_hand(module, x, index, weights), rtol=1e-12, atol=1e-12
    )


def test_parameters_start_at_one_and_share_the_expert_weights():
    plain = PlainExperts()
    module = CompressedExperts(plain, 2)
    assert module.gate_up_proj is plain.gate_up_proj and module.down_proj is plain.down_proj
    assert module.ce_gate.shape == (E, H) and module.ce_up.shape == (E, H) and module.ce_down.shape == (E, I)
    for vec in (module.ce_gate, module.ce_up, module.ce_down):
        assert torch.equal(vec, torch.ones_like(vec))


@pytest.mark.parametrize("n_ce", [0, 1, 3])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_matches_reference(n_ce, tokens):
    module = layer(n_ce)
    x = torch.randn(tokens, H)
    index, weights = routing(tokens, skip=(2, 5))  # experts 2 and 5 get no token
    torch.testing.assert_close(
        module(x, index, weights).double(), reference(module, x, index, weights), rtol=1e-5, atol=1e-6
    )


def test_depends_on_auxiliary_vectors_only_through_their_weighted_average():
    module = layer(2)
    x = torch.randn(3, H)  # 3 tokens x 2 auxiliary slots: at most 6 of the 8 experts are auxiliary
    index, weights = routing(3)
    before = module(x, index, weights)
    # Experts never auxiliary for any token: their vectors must not matter at all.
    aux = set(index.gather(-1, weights.argsort(-1, descending=True))[:, K - 2 :].flatten().tolist())
    never = [e for e in range(E) if e not in aux]
    assert never
    with torch.no_grad():
        module.ce_gate[never] = 5.0
        module.ce_down[never] = -3.0
    torch.testing.assert_close(module(x, index, weights), before, rtol=0, atol=0)
    # For one token, swapping the two auxiliary experts' vectors and weights together changes nothing.
    t = index[:1], weights[:1]
    one = module(x[:1], *t)
    flipped_weights = t[1].clone()
    order = t[1].argsort(-1, descending=True)[0]
    a, b = order[K - 2], order[K - 1]
    flipped_index = t[0].clone()
    flipped_index[0, a], flipped_index[0, b] = t[0][0, b], t[0][0, a]
    flipped_weights[0, a], flipped_weights[0, b] = t[1][0, b], t[1][0, a]
    torch.testing.assert_close(module(x[:1], flipped_index, flipped_weights), one, rtol=1e-6, atol=1e-7)


def test_gradients_match_the_reference():
    module = layer(2)
    x = torch.randn(33, H, requires_grad=True)
    index, weights = routing(33, skip=(0,))
    weights.requires_grad_(True)
    probe = torch.randn(33, H)
    (module(x, index, weights) * probe).sum().backward()
    params = [module.gate_up_proj, module.down_proj, module.ce_gate, module.ce_up, module.ce_down]
    ours = [p.grad.clone() for p in params] + [x.grad.clone(), weights.grad.clone()]
    for p in params:
        p.grad = None
    x.grad = weights.grad = None
    (reference(module, x, index, weights) * probe.double()).sum().backward()
    theirs = [p.grad for p in params] + [x.grad, weights.grad]
    for a, b in zip(ours, theirs):  # float32 sums of a few hundred terms against float64
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    assert module.ce_gate.grad[0].abs().sum() == 0  # expert 0 never routed: no gradient


def test_all_zero_auxiliary_weights_fall_back_to_a_uniform_average():
    module = layer(2)
    x = torch.randn(3, H)
    index, weights = routing(3)
    weights = weights.sort(-1, descending=True).values
    weights[:, 2:] = 0.0
    out = module(x, index, weights)
    assert torch.isfinite(out).all()
    uniform = reference(module, x, index, weights.where(weights > 0, torch.full_like(weights, 1e-9)))
    torch.testing.assert_close(out.double(), uniform, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:compressed experts held in")  # gradients in 16 bits: a numerics check
@pytest.mark.parametrize("n_ce", [0, 2])
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_compute_paths_agree_forward_and_backward(monkeypatch, n_ce, tokens, dtype, tol, device):
    if not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    module = layer(n_ce).to(device, dtype)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens)).to(device, dtype).requires_grad_(True)
    index, weights = routing(tokens, skip=(3,))  # expert 3 gets nothing; loads are uneven
    index, weights = index.to(device), weights.to(device, dtype)
    calls = []
    real = products.F.grouped_mm
    monkeypatch.setattr(products.F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for path in ("grouped", "loop", "auto"):
        module.path = path
        module.zero_grad()
        x.grad = None
        calls.clear()
        out = module(x, index, weights)
        # With gradients on, auto takes grouped_mm at every size (the loop only serves decode-sized and large
        # inference on CPU: test_auto_loops_for_decode_sized_and_large_inference_on_cpu_only).
        grouped = path in ("grouped", "auto")
        assert (len(calls) > 0) == grouped
        out.float().square().sum().backward()
        grads = [x.grad, module.gate_up_proj.grad, module.down_proj.grad]
        if n_ce:
            grads += [module.ce_gate.grad, module.ce_up.grad, module.ce_down.grad]
        runs[path] = [out.detach()] + [g.clone() for g in grads]
    for path in ("loop", "auto"):
        for a, b in zip(runs["grouped"], runs[path]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    # Against the float64 reference, bf16 rounding of the intermediate products adds up: 3e-2.
    ref_tol = tol if dtype == torch.float32 else 3e-2
    expected = reference(module.cpu(), x.detach().cpu(), index.cpu(), weights.cpu())
    torch.testing.assert_close(runs["loop"][0].double().cpu(), expected, rtol=ref_tol, atol=ref_tol)


@pytest.mark.filterwarnings("ignore:compressed experts held in")  # gradients in 16 bits: a numerics check
def test_forcing_a_path():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4))
    ce.set_compute_path(model, "loop")
    assert {m.path for m in model.modules() if isinstance(m, CompressedExperts)} == {"loop"}
    with pytest.raises(ce.CompressedExpertsError, match="choose from auto, decode, eager, fused, grouped, loop"):
        ce.set_compute_path(model, "triton")
    with pytest.raises(ce.CompressedExpertsError, match="convert it first"):
        ce.set_compute_path(ce.tiny_model("olmoe"), "loop")
    ce.set_compute_path(model, "decode")  # the fused kernels: inference on a CUDA device with Triton
    ids = torch.randint(3, 128, (1, 2))
    with pytest.raises(ce.CompressedExpertsError, match="gradients are on"):
        model(ids)
    if not torch.cuda.is_available():
        with torch.no_grad(), pytest.raises(ce.CompressedExpertsError, match="needs Triton and a CUDA device"):
            model(ids)
    odd = CompressedExperts(PlainExperts(), 1)  # I = 24 rows of bf16 are 48 bytes: aligned; make them not
    odd.gate_up_proj = nn.Parameter(torch.randn(E, 2 * 12, H, dtype=torch.float16))
    odd.down_proj = nn.Parameter(torch.randn(E, H, 12, dtype=torch.float16))
    odd.intermediate_dim, odd.path = 12, "grouped"
    odd.ce_down = nn.Parameter(torch.ones(E, 12, dtype=torch.float16))
    odd.ce_gate.data, odd.ce_up.data = odd.ce_gate.data.half(), odd.ce_up.data.half()
    index, weights = routing(4)
    with pytest.raises(ce.CompressedExpertsError, match="grouped path cannot run here: grouped_mm cannot take"):
        odd(torch.randn(4, H, dtype=torch.float16), index, weights.half())
    odd.path = "auto"
    assert odd(torch.randn(4, H, dtype=torch.float16), index, weights.half()).shape == (4, H)


def test_frozen_experts_get_no_gradient_but_compressed_experts_do():
    module = layer(2)
    module.gate_up_proj.requires_grad_(False)
    module.down_proj.requires_grad_(False)
    index, weights = routing(40)
    module(torch.randn(40, H), index, weights).square().sum().backward()
    assert module.gate_up_proj.grad is None and module.down_proj.grad is None
    assert module.ce_gate.grad.abs().sum() > 0 and module.ce_down.grad.abs().sum() > 0


def test_grouping_with_no_rows_for_most_experts():
    groups = products.Grouping.build(torch.tensor([[6], [6], [1]]), E)
    assert groups.offsets.tolist() == [0, 1, 1, 1, 1, 1, 3, 3]
    assert groups.token.tolist() == [2, 0, 1]


def test_equal_weights_keep_the_routers_order():
    module = layer(2)
    x = torch.randn(1, H)
    index = torch.tensor([[5, 1, 6, 2]])
    weights = torch.full((1, K), 0.25)
    # All weights tied: the reference's stable sort keeps 5 and 1 as main, 6 and 2 as auxiliary.
    out = module(x, index, weights)
    torch.testing.assert_close(out.double(), reference(module, x, index, weights), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, module(x, index.flip(-1), weights))  # so the order is what decided


def test_no_tokens():
    module = layer(2)
    out = module(torch.zeros(0, H), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
    assert out.shape == (0, H)


def test_auto_loops_for_decode_sized_and_large_inference_on_cpu_only(monkeypatch):
    if not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    module = layer(2)
    calls = []
    real = products.F.grouped_mm
    monkeypatch.setattr(products.F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    index, weights = routing(1)  # 1 token x 2 main experts: rows * 4 <= E
    x = torch.randn(1, H)
    with torch.no_grad():
        module(x, index, weights)
    assert not calls  # inference: the loop
    module(x, index, weights).sum().backward()
    assert calls  # a training step: grouped_mm, whose backward is the faster one at this size
    index, weights = routing(5)
    with torch.no_grad():
        calls.clear()
        module(torch.randn(5, H), index, weights)
    assert calls  # 10 rows > E / 4: grouped_mm
    for tokens, grouped in ((32 * E - 1, True), (32 * E, False)):  # large: 64 rows per expert and more
        index, weights = routing(tokens)
        calls.clear()
        with torch.no_grad():
            module(torch.randn(tokens, H), index, weights)
        assert bool(calls) == grouped, tokens
    calls.clear()
    module(torch.randn(tokens, H), index, weights).sum().backward()
    assert calls  # a training step at the large size: grouped_mm


BY_EXPERT_CASES = [
    dict(n_ce=0),
    dict(n_ce=2),
    dict(n_ce=2, form="subset", r=8),
    dict(n_ce=1, form="slim", r=8),
    dict(n_ce=None, top_p=0.6),
    dict(n_ce=None, form="slim", r=8, skip_below=0.5),
]


@pytest.mark.parametrize("case", BY_EXPERT_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_inference_on_cpu_goes_expert_by_expert(monkeypatch, case, dtype):
    """At 64 rows per expert and more, CPU inference runs each expert's whole MLP at once (cache, not
    FLOPs): it must give what the projection-by-projection products give, for every form and rule
    (ia3's scales, subset's neuron views, slim's own weights, pairs a rule skips), up to the matmul
    kernels' own rounding (the same sums in the same order; a half of the fused weight may take
    another kernel)."""
    if not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    case = dict(case)
    n_ce = case.pop("n_ce")
    module = CompressedExperts(PlainExperts(3), n_ce, **case).to(dtype)
    with torch.no_grad():  # the form's own parameters away from where they start
        for name, param in module.named_parameters():
            if name not in ("gate_up_proj", "down_proj"):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    tokens = 64 * E * 2  # 64 computed rows per expert in every run, whatever the split or rule
    index, weights = routing(tokens, seed=4, skip=(5,))
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(9)).to(dtype)
    taken = []
    real = products._by_expert
    monkeypatch.setattr(products, "_by_expert", lambda *a: taken.append(1) or real(*a))
    outs = {}
    with torch.no_grad():
        for path in ("grouped", "loop", "auto"):
            module.path = path
            taken.clear()
            outs[path] = module(x, index, weights)
            assert bool(taken) == (path != "grouped")
    same = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)  # bf16: an ulp
    torch.testing.assert_close(outs["loop"], outs["grouped"], **same)
    torch.testing.assert_close(outs["auto"], outs["grouped"], **same)
    if n_ce is not None and "form" not in case:  # and the method itself (ia3), against the reference
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        expected = reference(module.float(), x.float(), index, weights)
        torch.testing.assert_close(outs["loop"].double(), expected, rtol=tol, atol=tol)


def test_in_a_large_call_each_run_goes_where_its_own_size_is_faster(monkeypatch):
    """subset with n_ce 1 at 200 tokens: 600 main rows (75 per expert: expert by expert) and 200
    auxiliary ones (25 per expert: grouped_mm), both under auto, and the result is grouped's."""
    if not products.HAS_GROUPED_MM:
        pytest.skip("this torch build has no grouped_mm")
    module = CompressedExperts(PlainExperts(2), 1, "subset", 8)
    index, weights = routing(200)
    x = torch.randn(200, H)
    taken, calls = [], []
    real_by_expert, real_grouped_mm = products._by_expert, products.F.grouped_mm
    monkeypatch.setattr(products, "_by_expert", lambda *a: taken.append(1) or real_by_expert(*a))
    monkeypatch.setattr(products.F, "grouped_mm", lambda *a, **k: calls.append(1) or real_grouped_mm(*a, **k))
    with torch.no_grad():
        out = module(x, index, weights)
        assert taken == [1] and calls  # the main run expert by expert, the auxiliary one through grouped_mm
        module.path = "grouped"
        torch.testing.assert_close(out, module(x, index, weights), rtol=1e-6, atol=1e-7)
