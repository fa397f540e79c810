"""Compressed experts in a training loop of one's own (any trainer): a 16-bit model warns that its
vectors would not move, and float32_compressed_experts makes them train, outputs unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import compressed_layers, tokens

import compressed_experts as ce


def vectors(model) -> torch.Tensor:
    return torch.cat([layer.ce_gate.detach().float().flatten() for layer in compressed_layers(model)])


def step(model, lr: float = 2e-5) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    optimizer.step()


def test_a_bfloat16_loop_warns_that_the_vectors_will_not_move():
    model = ce.convert(ce.tiny_model("olmoe", dtype=torch.bfloat16), ce.CEConfig(4)).train()
    with pytest.warns(UserWarning, match="bfloat16 are being trained.*float32_compressed_experts"):
        step(model)
    assert torch.equal(vectors(model), torch.ones_like(vectors(model)))  # what the warning is about


def test_float32_vectors_train_in_a_bfloat16_model_with_the_same_outputs():
    model = ce.convert(ce.tiny_model("olmoe", dtype=torch.bfloat16), ce.CEConfig(4))
    with torch.no_grad():
        before = model.eval()(tokens()).logits
    ce.float32_compressed_experts(model)
    assert {p.dtype for n, p in model.named_parameters() if ce.layer.is_compressed_expert(n)} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, before)  # cast per call: the same bfloat16 model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model.train())
    assert (vectors(model) != 1.0).sum() > 0.9 * vectors(model).numel()


def test_inference_and_float32_models_do_not_warn():
    model = ce.convert(ce.tiny_model("olmoe", dtype=torch.bfloat16), ce.CEConfig(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.train()(tokens())  # no gradients: nothing trains
        step(ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4)).train())


def test_float32_compressed_experts_needs_a_converted_model():
    with pytest.raises(ce.CompressedExpertsError, match="convert it first"):
        ce.float32_compressed_experts(ce.tiny_model("olmoe"))
