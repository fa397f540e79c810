"""torch.compile and torch.export of compressed-experts models: no graph break inside a block, any
length from one token, gradients through the compiled block equal to eager ones (traceable.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, compressed_layers, randomise_compressed_experts, tokens
from torch.export import Dim

import compressed_experts as ce
from compressed_experts.prune import prune

pytestmark = pytest.mark.compiles  # run last: conftest.py says why

FORMS = [("ia3", None), ("none", None), ("subset", 2), ("slim", 2)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def moe_block(model):
    """The family's own MoE block (router, shared experts) around the first compressed-experts module."""
    experts = compressed_layers(model)[0]
    return next(m for m in model.modules() if getattr(m, "experts", None) is experts)


def first(output):
    return output[0] if isinstance(output, tuple) else output


def converted(family: str, form: str = "ia3", r: int | None = None, dtype=torch.float32):
    model = ce.from_pretrained(f"tiny:{family}", n_ce=1, form=form, r=r, dtype=dtype).eval()
    if form == "ia3":
        randomise_compressed_experts(model)
    return model


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("form, r", FORMS)
def test_a_block_compiles_whole_at_every_length(family, form, r):
    model = converted(family, form, r)
    block = moe_block(model)
    compiled = torch.compile(block, fullgraph=True, backend="eager", dynamic=True)  # any graph break raises
    with torch.no_grad():
        for length in (1, 3, 17):
            x = torch.randn(2, length, model.config.hidden_size)
            torch.testing.assert_close(first(compiled(x)), first(block(x)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_whole_model_compiles_with_inductor(dtype):
    model = converted("olmoe", dtype=dtype)
    compiled = torch.compile(model)
    with torch.no_grad():
        expected, got = model(tokens()).logits, compiled(tokens()).logits
    # Inductor fuses and reorders: float32 agrees to rounding, bfloat16 to a few of its ulps.
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tolerance)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_compiled_training_gives_the_eager_gradients():
    model = converted("olmoe")
    ids = tokens()

    def gradients(forward):
        model.zero_grad()
        forward(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = gradients(model)
    got = gradients(torch.compile(model, backend="aot_eager"))
    assert got.keys() == expected.keys() and any(ce.layer.is_compressed_expert(n) for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_block_exports_with_a_dynamic_length_from_one_token(tmp_path):
    model = converted("olmoe")
    block = moe_block(model)
    example = torch.randn(1, 5, model.config.hidden_size)
    exported = torch.export.export(block, (example,), dynamic_shapes={"hidden_states": {1: Dim("length", min=1)}})
    torch.export.save(exported, tmp_path / "block.pt2")
    reloaded = torch.export.load(tmp_path / "block.pt2")  # holds the parameters, nothing process-specific
    with torch.no_grad():
        for length in (1, 2, 4, 30):
            x = torch.randn(1, length, model.config.hidden_size)
            torch.testing.assert_close(first(reloaded.module()(x)), first(block(x)), rtol=0, atol=0)


def test_an_activation_without_a_transformers_name_is_refused_by_name():
    with pytest.raises(TypeError, match="Tanhshrink has no transformers name"):
        ce.traceable.activation_name(torch.nn.Tanhshrink())


def test_a_block_pruned_with_stand_ins_compiles_whole():
    """The kept_experts rule reaches the operator (its removed experts' weights gone, its stand-ins numbered from 0)."""
    model = ce.tiny_model("olmoe").eval()
    prune(model, torch.randint(4, 128, (8, 64)), keep=16, stand_in="slim", r=4, fit_steps=0)
    block = moe_block(model)
    compiled = torch.compile(block, fullgraph=True, backend="eager", dynamic=True)  # any graph break raises
    with torch.no_grad():
        for length in (1, 17):
            x = torch.randn(2, length, model.config.hidden_size)
            torch.testing.assert_close(first(compiled(x)), first(block(x)), rtol=0, atol=0)
