"""The same numerics on a CUDA device; skipped where there is none (CI never has one)."""

from __future__ import annotations

import pytest
import torch

import compressed_experts as ce
import compressed_experts.dispatch as dispatch
from conftest import randomise_compressed_experts, reference_experts, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_layer_on_cuda_matches_the_reference(dtype, tol):
    model = ce.convert(ce.tiny_model("olmoe", dtype=dtype), ce.CEConfig(4))
    randomise_compressed_experts(model)
    model.cuda()
    calls = []
    layer = next(m for m in model.modules() if isinstance(m, ce.CompressedExperts))
    layer.register_forward_hook(lambda mod, args, out: calls.append((args, out)))
    with torch.no_grad():
        model(tokens().cuda())
    (x, index, weights), out = calls[0]
    expected = reference_experts(
        x.cpu(), layer.gate_up_proj.cpu(), layer.down_proj.cpu(), layer.act_fn, index.cpu(), weights.cpu(),
        4, layer.ce_gate.cpu(), layer.ce_up.cpu(), layer.ce_down.cpu(),
    )
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol)


def test_cuda_paths_agree_forward_and_backward(monkeypatch):
    model = ce.convert(ce.tiny_model("qwen3_moe", dtype=torch.bfloat16), ce.CEConfig(2)).cuda().train()
    randomise_compressed_experts(model)
    ids = tokens().cuda()
    results = []
    for has_grouped in (dispatch._HAS_GROUPED_MM, False):
        monkeypatch.setattr(dispatch, "_HAS_GROUPED_MM", has_grouped)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.float().clone() for n, p in model.named_parameters() if "ce_" in n or "gate_up" in n]
        results.append((loss.detach().float(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_generate_on_cuda_matches_cpu():
    model = ce.convert(ce.tiny_model("mixtral"), ce.CEConfig(2))
    randomise_compressed_experts(model)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    on_cpu = model.generate(tokens(2, 5), **settings)
    on_gpu = model.cuda().generate(tokens(2, 5).cuda(), **settings)
    assert torch.equal(on_cpu, on_gpu.cpu())
