"""The same numerics on a CUDA device; skipped where there is none (CI never has one)."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed_layers, randomise_compressed_experts, reference, tokens

import compressed_experts as ce
import compressed_experts.backends.products as products
from compressed_experts.backends import decode as decode_kernel

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
    expected = reference(layer, x, index, weights)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_cuda_paths_agree_forward_and_backward(monkeypatch):
    model = ce.convert(ce.tiny_model("qwen3_moe", dtype=torch.bfloat16), ce.CEConfig(2)).cuda().train()
    randomise_compressed_experts(model)
    ids = tokens().cuda()
    results = []
    for has_grouped in (products.HAS_GROUPED_MM, False):
        monkeypatch.setattr(products, "HAS_GROUPED_MM", has_grouped)
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("settings", [ce.CEConfig(1), ce.CEConfig(1, "none"), ce.CEConfig(0)])
def test_fused_decode_kernels_match_the_reference_in_every_family(family, settings, dtype, tol, monkeypatch):
    if not decode_kernel.available():
        pytest.skip("needs Triton")
    model = ce.convert(ce.tiny_model(family, dtype=dtype), settings).cuda()
    if settings.form == "ia3" and settings.n_ce:
        randomise_compressed_experts(model)
    ce.set_compute_path(model, "decode")
    used = []
    real = decode_kernel.fused_decode
    monkeypatch.setattr(decode_kernel, "fused_decode", lambda *a: used.append(1) or real(*a))
    calls = []
    for layer in compressed_layers(model):
        layer.register_forward_hook(lambda mod, args, out: calls.append((mod, args, out)))
    with torch.no_grad():
        model(tokens(1, 1).cuda())
    assert used and len(used) == len(calls)
    for layer, (x, index, weights), out in calls:
        torch.testing.assert_close(out.double(), reference(layer, x, index, weights), rtol=tol, atol=tol)


def test_auto_takes_the_decode_path_for_decode_sized_inference_only(monkeypatch):
    if not decode_kernel.available():
        pytest.skip("needs Triton")
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4)).cuda()  # 64 experts, 4 main: rows <= 128
    randomise_compressed_experts(model)
    used = []
    real = decode_kernel.fused_decode
    monkeypatch.setattr(decode_kernel, "fused_decode", lambda *a: used.append(a[0].shape[0]) or real(*a))
    ids = tokens(1, 1).cuda()
    with torch.no_grad():
        model(ids)
        model(tokens(1, 32).cuda())
        model(tokens(1, 33).cuda())  # 132 rows: grouped
    model(ids)  # gradients on: grouped
    assert used == [1, 1, 32, 32]  # two blocks per call
    ce.set_compute_path(model, "decode")
    with pytest.raises(ce.CompressedExpertsError, match="gradients are on"):
        model(ids)
    with torch.no_grad():
        forced = model(tokens(2, 9).cuda()).logits  # forced: runs at any size
        ce.set_compute_path(model, "grouped")
        grouped = model(tokens(2, 9).cuda()).logits
    torch.testing.assert_close(forced, grouped, rtol=1e-4, atol=1e-4)
    subset = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4, "subset")).cuda()
    ce.set_compute_path(subset, "decode")
    with (
        torch.no_grad(),
        pytest.raises(ce.CompressedExpertsError, match="the subset form has no decode implementation"),
    ):
        subset(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_compiles_on_cuda(dtype):
    """torch.compile with inductor on CUDA: the block is one opaque operator (traceable.py), outputs agree."""
    model = ce.convert(ce.tiny_model("olmoe", dtype=dtype), ce.CEConfig(4)).cuda().eval()
    randomise_compressed_experts(model)
    ids = tokens().cuda()
    with torch.no_grad():
        expected, got = model(ids).logits, torch.compile(model)(ids).logits
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=1e-3 if dtype == torch.float32 else 0.1)
