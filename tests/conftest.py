"""Shared fixtures and the deliberately simple reference implementation of method.md."""

from __future__ import annotations

import pytest
import torch

import compressed_experts as ce

FAMILY_NAMES = [family.model_types[0] for family in ce.FAMILIES]  # a new family is tested automatically


def reference_experts(x, gate_up, down, act, index, weights, n_ce, ce_gate, ce_up, ce_down):
    """method.md, token by token, in float64: sort by weight, split, average the auxiliary
    vectors with renormalised auxiliary weights, run the main experts with raw weights."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    ce_gate, ce_up, ce_down = ce_gate.double(), ce_up.double(), ce_down.double()
    inter = down.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, e = weights[t].double(), index[t].tolist()
        order = sorted(range(len(e)), key=lambda j: -w[j].item())
        main, aux = order[: len(e) - n_ce], order[len(e) - n_ce :]
        g = torch.ones(x.shape[1], dtype=torch.float64)
        u = torch.ones(x.shape[1], dtype=torch.float64)
        d = torch.ones(inter, dtype=torch.float64)
        if aux:
            total = sum(w[j] for j in aux)
            g = sum(w[j] / total * ce_gate[e[j]] for j in aux)
            u = sum(w[j] / total * ce_up[e[j]] for j in aux)
            d = sum(w[j] / total * ce_down[e[j]] for j in aux)
        for j in main:
            gate = gate_up[e[j], :inter] @ (x[t] * g)
            up = gate_up[e[j], inter:] @ (x[t] * u)
            out[t] = out[t] + w[j] * (down[e[j]] @ (act(gate) * up * d))
    return out


def compressed_layers(model):
    return [m for m in model.modules() if isinstance(m, ce.CompressedExperts)]


def randomise_compressed_experts(model, seed: int = 0, low: float = 0.3, high: float = 1.7) -> None:
    """Give every compressed expert random values, so that tests see more than the 1.0 start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in compressed_layers(model):
            for vec in (layer.ce_gate, layer.ce_up, layer.ce_down):
                vec.copy_(torch.empty(vec.shape).uniform_(low, high, generator=generator))


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


def tokens(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(a, b):
    """Logits of a model and of its reloaded copy: equal weights, but a CPU matmul's rounding can
    depend on where a tensor starts in memory (safetensors loads at 8-byte offsets), so equal up
    to float rounding, far below what any changed weight moves."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
