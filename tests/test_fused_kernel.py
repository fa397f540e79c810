"""The ``fused`` backend's Triton kernels against the library's float64 per-token reference (the
eager backend): the output and every gradient (input, routing weights, expert weights, compressed
experts), on routings that give experts no row, one row and several tiles of rows.

On a CUDA device they run there; without one, under Triton's interpreter on the CPU (conftest.py
sets ``TRITON_INTERPRET=1``), slowly: the cases are small. Skipped where Triton is not installed.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import compressed_experts as ce
from compressed_experts import CompressedExperts
from compressed_experts.backends import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not fused.available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton, and a CUDA device or TRITON_INTERPRET=1",
)

# Not multiples of the tiles (16 under the interpreter), and more than one tile of each.
EXPERTS, HIDDEN, INTER, SLOTS, TOKENS = 8, 40, 36, 4, 24


class Experts(nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter((torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype))
        self.down_proj = nn.Parameter((torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER**0.5).to(dtype))
        self.act_fn = nn.SiLU()


def uneven_routing(seed=0):
    """Every token routes to expert 0 (several tiles of rows), token 0 alone to expert 6 (one row),
    nobody to expert 7 (no row); the rest at random. Weights unsorted, with a tie."""
    g = torch.Generator().manual_seed(seed)
    index = torch.empty(TOKENS, SLOTS, dtype=torch.int64)
    for t in range(TOKENS):
        others = torch.randperm(5, generator=g)[: SLOTS - 1] + 1  # experts 1..5
        index[t] = torch.cat([torch.tensor([0]), others])[torch.randperm(SLOTS, generator=g)]
    index[0] = torch.tensor([0, 6, 1, 2])
    weights = torch.rand(TOKENS, SLOTS, generator=g).softmax(-1)
    weights[1, 2] = weights[1, 1]  # a tie: the earlier slot ranks first on every path
    return index, weights


def make(form, rule, dtype, seed=0):
    kwargs = {name: value for name, value in rule.items() if name != "n_ce"}
    r = 8 if form == "slim" else None  # fewer neurons than one tile: a masked product
    layer = CompressedExperts(Experts(dtype, seed), rule.get("n_ce"), form, r, **kwargs)
    if form == "ia3":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for vec in (layer.ce_gate, layer.ce_up, layer.ce_down):
                vec.copy_(torch.empty(vec.shape).uniform_(0.3, 1.7, generator=g).to(vec.dtype))
    return layer


def output_and_grads(layer, x, index, weights, probe):
    """The block's output and the gradients of ``(output * probe).sum()`` by name."""
    x = x.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = layer(x, index, weights)
    (out * probe.to(out.dtype)).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), dict(grads, x=x.grad, routing_weights=weights.grad)


def run_both(form, rule, dtype, index=None, weights=None):
    """(fused on DEVICE, float64 eager reference) outputs and gradients of one block."""
    layer = make(form, rule, dtype).to(DEVICE).eval()  # eval: no warning about training bfloat16 vectors
    reference = copy.deepcopy(layer).cpu().double()
    layer.path, reference.path = "fused", "eager"
    if index is None:
        index, weights = uneven_routing()
    g = torch.Generator().manual_seed(2)
    x, probe = torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    got = output_and_grads(layer, on(x.to(dtype)), on(index), on(weights), on(probe))
    want = output_and_grads(reference, x.to(dtype).double(), index, weights.double(), probe.double())
    return got, want


def relative(a, b):
    return ((a.cpu().double() - b).abs().max() / b.abs().max()).item()


F32, BF16 = (torch.float32, 2e-5), (torch.bfloat16, 3e-2)
CASES = [  # every rule and form in float32; bfloat16 on full top-k, the paper's form and a per-token rule
    ("none", {"n_ce": 0}, *F32),  # full top-k
    ("none", {"n_ce": 2}, *F32),  # top-m
    ("ia3", {"n_ce": 2}, *F32),
    ("ia3", {"n_ce": 1}, *F32),
    ("ia3", {"top_p": 0.6}, *F32),
    ("none", {"skip_below": 0.5}, *F32),
    ("slim", {"n_ce": 2}, *F32),  # auxiliary experts of their own: a second product per call
    ("slim", {"top_p": 0.6}, *F32),
    ("none", {"n_ce": 0}, *BF16),
    ("ia3", {"n_ce": 2}, *BF16),
    ("ia3", {"top_p": 0.6}, *BF16),
]


@pytest.mark.parametrize(
    "form,rule,dtype,tol", CASES, ids=[f"{f}-{next(iter(r.items()))}-{str(d)[6:]}" for f, r, d, _ in CASES]
)
def test_output_and_every_gradient_match_the_float64_reference(form, rule, dtype, tol):
    (out, grads), (ref_out, ref_grads) = run_both(form, rule, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert relative(out, ref_out) < tol
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert grads[name] is not None, name
        assert grads[name].dtype == (dtype if name != "routing_weights" else torch.float32), name
        assert relative(grads[name], ref_grads[name]) < tol, name
    # Expert 7 got no row: its weights' gradient is exactly zero, not left uninitialised.
    assert grads["gate_up_proj"][7].abs().max() == 0 and grads["down_proj"][7].abs().max() == 0


def test_the_tolerances_can_fail():
    """What the tolerances above would miss is far smaller than what dropping the compressed experts
    moves, in the output and in the gradients (bfloat16's tolerance is that of the loop path's own
    rounding, measured: 0.4-1.5% of the largest value on these cases)."""
    (out, grads), _ = run_both("ia3", {"n_ce": 2}, torch.float32)
    (plain_out, plain_grads), _ = run_both("none", {"n_ce": 2}, torch.float32)
    assert relative(plain_out, out.double()) > 10 * BF16[1]
    for name in ("x", "gate_up_proj", "down_proj", "routing_weights"):
        assert relative(plain_grads[name], grads[name].double()) > 10 * BF16[1], name


@pytest.mark.parametrize("experts,block_m", [(8, 16), (64, 32)])
def test_alignment_groups_pairs_by_expert_in_pair_order(experts, block_m):
    """The alignment kernel against a plain reading of what it must produce, over several of its
    128-pair blocks: each expert's pairs in pair order at its start, padding elsewhere, starts at
    padded block boundaries, every tile's expert (the id ``experts``, not main, gets no row)."""
    g = torch.Generator().manual_seed(experts)
    ids = torch.randint(0, experts + 1, (300,), generator=g)  # id ``experts``: pairs not main
    ids[:40] = 3  # one expert with many rows across a block boundary of the kernel's loop
    aligned = fused._Aligned(ids.view(100, 3).to(DEVICE), experts, block_m)
    sorted_pair, starts, counts = (t.cpu().long() for t in (aligned.sorted_pair, aligned.starts, aligned.counts))
    tile_expert = aligned.tile_expert.cpu().long()
    assert aligned.capacity >= 300 + experts * (block_m - 1) and aligned.capacity % block_m == 0
    position = 0
    for e in range(experts):
        rows = (ids == e).nonzero().squeeze(1)
        assert counts[e] == len(rows) and starts[e] == position
        assert torch.equal(sorted_pair[position : position + len(rows)], rows)
        padded = -(-len(rows) // block_m) * block_m
        assert (sorted_pair[position + len(rows) : position + padded] == 300).all()
        assert (tile_expert[position // block_m : (position + padded) // block_m] == e).all()
        position += padded
    assert (sorted_pair[position:] == 300).all() and (tile_expert[position // block_m :] == experts).all()


def test_a_call_with_no_tokens():
    layer = make("ia3", {"n_ce": 2}, torch.float32).to(DEVICE)
    layer.path = "fused"
    empty = torch.empty(0, SLOTS, dtype=torch.int64, device=DEVICE)
    out = layer(torch.empty(0, HIDDEN, device=DEVICE), empty, empty.float())
    assert out.shape == (0, HIDDEN)


def test_int32_ids_and_bfloat16_routing_weights():
    index, weights = uneven_routing(seed=3)
    (out, grads), (ref_out, ref_grads) = run_both("ia3", {"n_ce": 2}, torch.float32, index.int(), weights.bfloat16())
    assert relative(out, ref_out) < 2e-5
    assert grads["routing_weights"].dtype == torch.bfloat16
    assert relative(grads["compressed.ce_down"], ref_grads["compressed.ce_down"]) < 2e-5


def test_inference_without_gradients_matches_training_forward():
    layer = make("ia3", {"n_ce": 2}, torch.float32).to(DEVICE)
    layer.path = "fused"
    index, weights = uneven_routing()
    x = torch.randn(TOKENS, HIDDEN).to(DEVICE)
    with torch.no_grad():
        quiet = layer(x, index.to(DEVICE), weights.to(DEVICE))
    assert torch.equal(quiet, layer(x, index.to(DEVICE), weights.to(DEVICE)).detach())


def test_a_model_on_the_fused_path_gives_the_reference_logits_and_trains():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(n_ce=1))
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ce.set_compute_path(model, "eager")
    with torch.no_grad():
        want = model(ids).logits
    ce.set_compute_path(model, "fused")
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), want, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "ce_" in n)


def test_refusals_say_why(monkeypatch):
    layer = CompressedExperts(Experts(torch.float32), 2, "subset", 8)
    ce.set_compute_path(layer, "fused")
    index, weights = uneven_routing()
    with pytest.raises(ce.CompressedExpertsError, match="subset form has no fused implementation"):
        layer(torch.randn(TOKENS, HIDDEN), index, weights)
    plain = make("ia3", {"n_ce": 2}, torch.float64)
    plain.path = "fused"
    with pytest.raises(ce.CompressedExpertsError, match="one dtype: bfloat16, float16 or float32"):
        plain(torch.randn(TOKENS, HIDDEN, dtype=torch.float64), index, weights)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        layer = make("ia3", {"n_ce": 2}, torch.float32)
        layer.path = "fused"
        with pytest.raises(ce.CompressedExpertsError, match="needs a CUDA device"):
            layer(torch.randn(TOKENS, HIDDEN), index, weights)
