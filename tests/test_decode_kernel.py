"""The fused decode kernels against the library's float64 per-token reference (the eager backend).

They run on a CUDA device; without one, Triton's interpreter runs them on the CPU when Triton is
installed and ``TRITON_INTERPRET=1`` is set (how they were written on a machine with no GPU).
Skipped where neither is possible, as in CI.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import reference

from compressed_experts import CompressedExperts
from compressed_experts.backends import decode as decode_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not decode_kernel.available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton, and a CUDA device or TRITON_INTERPRET=1",
)


def case(tokens, hidden, inter, n_ce, experts=8, slots=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    x = torch.randn(tokens, hidden, generator=g)
    index = torch.stack([torch.randperm(experts, generator=g)[:slots] for _ in range(tokens)])
    weights = torch.rand(tokens, slots, generator=g).softmax(-1)  # unsorted: the kernel ranks them
    if n_ce and slots - n_ce:  # a tie across the main/auxiliary boundary: the earlier slot is main
        ranked = weights[0].argsort(descending=True)
        weights[0, ranked[slots - n_ce]] = weights[0, ranked[slots - n_ce - 1]]
    if tokens > 1:
        weights[1, -2:] = 0.0  # lightest weights all zero: the auxiliary average falls back to uniform
    vectors = [torch.empty(experts, n).uniform_(0.3, 1.7, generator=g) for n in (hidden, hidden, inter)]
    return [t.to(dtype) for t in (x, gate_up, down)], index, weights, [v.to(dtype) for v in vectors]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n_ce,with_vectors", [(2, True), (2, False), (0, False), (3, True)])
def test_fused_decode_matches_the_reference(dtype, tol, n_ce, with_vectors):
    check(case(1, 48, 40, n_ce, dtype=dtype), n_ce, with_vectors, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_shapes_that_are_not_block_multiples_over_several_k_blocks(dtype, tol):
    """Three tokens, hidden and intermediate sizes past one 256-wide K block and not multiples of the
    output blocks (one rule only: under the interpreter on a CPU each such case takes seconds)."""
    check(case(3, 300, 270, 2, dtype=dtype), 2, True, tol)


@pytest.mark.parametrize("slots,n_ce", [(1, 0), (3, 1), (6, 2)])  # slot counts that are not powers of two
def test_padded_slots_bf16_routing_weights_and_int32_ids(slots, n_ce):
    (x, gate_up, down), index, weights, vectors = case(3, 40, 24, n_ce, slots=slots)
    check(((x, gate_up, down), index.int(), weights.bfloat16(), vectors), n_ce, bool(n_ce), 1e-5)


def check(inputs, n_ce, with_vectors, tol):
    (x, gate_up, down), index, weights, vectors = inputs
    dtype = x.dtype
    on = lambda t: t.to(DEVICE)  # noqa: E731
    out = decode_kernel.fused_decode(
        on(x),
        on(index),
        on(weights),
        on(gate_up),
        on(down),
        n_ce,
        tuple(map(on, vectors)) if with_vectors else None,
    )
    assert out.dtype == dtype and out.shape == x.shape
    expected = reference_on(x, gate_up, down, index, weights, n_ce, vectors if with_vectors else None)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)
    # The tolerance means something: dropping the compressed experts moves the output far more.
    if with_vectors:
        plain = reference_on(x, gate_up, down, index, weights, n_ce, None)
        assert (plain - expected).abs().max() > 10 * tol


def reference_on(x, gate_up, down, index, weights, n_ce, vectors):
    """The reference for raw weights: a block built on them (ia3 with ``vectors``, else top-m)."""
    experts = torch.nn.Module()
    experts.gate_up_proj, experts.down_proj, experts.act_fn = gate_up, down, torch.nn.SiLU()
    layer = CompressedExperts(experts, n_ce, "ia3" if vectors is not None else "none")
    if vectors is not None:
        for name, vector in zip(("ce_gate", "ce_up", "ce_down"), vectors):
            getattr(layer, name).data = vector
    return reference(layer, x, index, weights)
