"""Shared fixtures and helpers; the oracle is the library's own per-token reference (the eager backend)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

# Without a GPU, Triton's interpreter runs the library's kernels on the CPU (slowly, so only small
# cases): how the kernel tests check them in CI. Set before the package defines its kernels. Not in
# the serving environment, whose vLLM engine processes inherit it and use Triton themselves.
if not torch.cuda.is_available() and importlib.util.find_spec("vllm") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import compressed_experts as ce
from compressed_experts.backends import BACKENDS
from compressed_experts.routing import Call

FAMILY_NAMES = [family.model_types[0] for family in ce.FAMILIES]  # a new family is tested automatically


def reference(layer, x, index, weights, n_ce=None):
    """The library's per-token reference (the ``eager`` backend) on ``layer``, in float64: the
    oracle every fast path is checked against. ``test_layer`` checks it against the method
    written out by hand."""
    call = Call(layer, x.double(), index, weights, layer.n_ce if n_ce is None else n_ce)
    return BACKENDS["eager"].run(call)


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


# A small experts module and routing for the layer-level tests (test_layer, test_forms).
E, H, I, K = 8, 16, 24, 4


class PlainExperts(nn.Module):
    """The attributes a transformers experts module has, with random weights."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, I, generator=g) / I**0.5)
        self.act_fn = nn.SiLU()


def routing(tokens, seed=0, skip=()):
    """Random top-K routing (unsorted weights) over the experts not in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    scores = torch.rand(tokens, len(allowed), generator=g)
    top = scores.topk(K, dim=-1).indices
    index = allowed[top]
    weights = torch.rand(tokens, K, generator=g).softmax(-1)  # not sorted: the layer must sort
    return index, weights


# Helpers of the fitting and fine-tuning tests (test_fit, test_training, test_training_forms, test_cli).


def full_twin(model):
    """A copy of a converted model that runs all k experts (n_ce = 0, no per-token rule) on the same weights."""
    import copy

    twin = copy.deepcopy(model)
    for layer in compressed_layers(twin):
        layer.n_ce, layer.top_p, layer.skip_below = 0, None, None
    return twin


def distance_to_full(model, ids):
    """Mean squared difference of the model's logits from those of its full top-k twin."""
    with torch.no_grad():
        return (model(ids).logits - full_twin(model)(ids).logits).square().mean().item()


# Lively settings for a tiny random model: a large learning rate so a few steps show a drop.
FAST = dict(model="tiny:olmoe", seq_len=64, batch_size=4, lr=3e-3, logging_steps=1, warmup=0.0)


def write_arithmetic(path, n: int = 120, seed: int = 0):
    """A small instruction dataset at ``path``: additions with worked answers (repetitive, so it is learnable)."""
    import json

    gen = torch.Generator().manual_seed(seed)
    with path.open("w") as handle:
        for a, b in torch.randint(1, 60, (n, 2), generator=gen).tolist():
            handle.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"{a} + {b} = {a + b}."}) + "\n")
    return path


class FakeClock:
    """perf_counter for interleaved_medians: each timed function moves it on by its own next duration."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def runner(self, name, durations, calls):
        durations = iter(durations)

        def run():
            calls.append(name)
            self.now += next(durations)

        return run


def pytest_collection_modifyitems(items):
    """The tests marked ``compiles`` (torch.compile) run last. After a model is compiled and trained once
    in a process, eager training in that process stays slower (measured: 7-40% on the bundled model; the
    methods study's test took 52 s after test_compile.py and 46 s after test_dynamic_routing.py's compile
    tests, 27 s after test_bench.py), so every test after them paid for it."""
    items.sort(key=lambda item: item.get_closest_marker("compiles") is not None)  # stable: the rest keep their order
