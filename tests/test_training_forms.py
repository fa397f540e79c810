"""Fine-tuning the subset and slim forms, fitted checkpoints, and the distillation term."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAST, compressed_layers, distance_to_full, reference, tokens, write_arithmetic

import compressed_experts as ce
from compressed_experts.training import TrainConfig, train


@pytest.fixture
def data(tmp_path):
    return write_arithmetic(tmp_path / "data.jsonl")


def test_slim_trains_alone_and_its_file_applies_back(tmp_path, data):
    out = tmp_path / "slim"
    result = train(TrainConfig(data=str(data), out=str(out), form="slim", r=4, trainable="ce", max_steps=6, **FAST))
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["form"], summary["r"], summary["n_ce"]) == ("slim", 4, 4)
    assert ce.ce_config_of(ce.from_pretrained(out)) == ce.CEConfig(4, "slim", r=4)
    start = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4, "slim", r=4))
    trained = dict(result.model.named_parameters())
    changed = {n for n, p in start.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all(n.endswith(("ce_gate_up_proj", "ce_down_proj")) for n in changed)
    applied = ce.apply_compressed_experts(ce.tiny_model("olmoe"), out / "compressed_experts.safetensors")
    ids = tokens()
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-6)


def test_a_fitted_checkpoint_trains_in_its_own_form(tmp_path, data):
    fitted = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2, "subset", r=3))
    fitted.save_pretrained(tmp_path / "fitted")
    ce.tiny_tokenizer().save_pretrained(tmp_path / "fitted")
    settings = {**FAST, "model": str(tmp_path / "fitted"), "data": str(data), "max_steps": 3}
    result = train(TrainConfig(out=str(tmp_path / "run"), **settings))  # form, r and n_ce from the checkpoint
    assert ce.ce_config_of(result.model) == ce.CEConfig(2, "subset", r=3)
    with pytest.raises(ce.CompressedExpertsError, match=r"already has compressed experts \(n_ce=2, form=subset, r=3\)"):
        train(TrainConfig(out=str(tmp_path / "other"), form="slim", **settings))
    with pytest.raises(ce.CompressedExpertsError, match="subset adds no parameters"):
        train(TrainConfig(out=str(tmp_path / "other"), trainable="ce", **settings))
    assert not (tmp_path / "other").exists()


def test_distill_loss_is_the_relative_distance_to_the_full_block():
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(3))
    layer = compressed_layers(model)[0]
    layer.distill = True
    layer.train()
    x = torch.randn(20, layer.hidden_dim)
    index = torch.stack([torch.randperm(layer.num_experts)[:8] for _ in range(20)])
    weights = torch.rand(20, 8).softmax(-1)
    layer(x, index, weights)
    # Against the per-token reference: the converted block and the full top-k block (n_ce = 0).
    out, full = reference(layer, x, index, weights), reference(layer, x, index, weights, n_ce=0)
    expected = (out - full).square().mean() / full.square().mean()
    torch.testing.assert_close(layer.distill_loss.double(), expected, rtol=1e-4, atol=0)
    layer.eval()
    layer.distill_loss = None
    layer(x, index, weights)
    assert layer.distill_loss is None  # evaluation never pays for the full pass


def test_distillation_gradients_survive_gradient_checkpointing():
    def grads(checkpointing):
        torch.manual_seed(0)
        model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(4, "slim", r=4))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        layers = compressed_layers(model)
        for layer in layers:
            layer.distill = True
        ids = tokens()
        loss = model(ids, labels=ids).loss + torch.stack([layer.distill_loss for layer in layers]).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("ce_down_proj")}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        assert plain[name].abs().max() > 0
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_distillation_keeps_the_model_closer_to_full_top_k(tmp_path, data):
    ids = tokens()

    def run(weight):
        out = tmp_path / f"d{weight}"
        result = train(
            TrainConfig(
                data=str(data),
                out=str(out),
                form="slim",
                r=4,
                trainable="ce",
                max_steps=8,
                distill_weight=weight,
                **FAST,
            )
        )
        log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
        return result.model.eval(), log

    plain, plain_log = run(0.0)
    distilled, log = run(50.0)
    assert all("distill" not in e for e in plain_log)
    assert sum("distill" in e for e in log) == 8 and all(e["distill"] >= 0 for e in log if "distill" in e)
    assert distance_to_full(copy.deepcopy(distilled), ids) < distance_to_full(copy.deepcopy(plain), ids)
    assert not any(layer.distill for layer in compressed_layers(distilled))


def test_distillation_weight_does_not_grow_with_gradient_accumulation(tmp_path, data):
    """One step of batch 4, and of 2 x 2 accumulated, log the same loss (LM + weight x distill)."""
    settings = {**FAST, "data": str(data), "form": "slim", "r": 4, "max_steps": 1, "distill_weight": 5.0}

    def logged(out, **change):
        train(TrainConfig(out=str(tmp_path / out), **{**settings, **change}))
        entry = next(
            e for e in map(json.loads, (tmp_path / out / "training_log.jsonl").read_text().splitlines()) if "loss" in e
        )
        return entry["loss"], entry["distill"]

    (whole, distill), (split, _) = logged("whole"), logged("split", batch_size=2, grad_accum=2)
    # Each micro-batch's distill term is a ratio of its own means, so the two agree closely, not
    # exactly; counting the term once per micro-batch would add another 5 x distill.
    assert 5.0 * distill > 0.05
    assert abs(split - whole) < 0.1 * 5.0 * distill


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(method="top-m", form="slim"), "form and r choose the compressed experts of method ce"),
        (dict(form="none"), "none is method top-m"),
        (dict(form="ia3", r=4), "form ia3 has none"),
        (dict(form="slim", r=0), "r must be a whole number"),
        (dict(method="full", distill_weight=1.0), "method full has none"),
        (dict(distill_weight=-1.0), "distill_weight must be 0 or more"),
        (dict(form="slim", r=999), "use r between 1 and"),
    ],
)
def test_bad_form_settings_fail_before_training(tmp_path, data, change, message):
    with pytest.raises(ce.CompressedExpertsError, match=message):
        train(TrainConfig(**{**FAST, "data": str(data), "out": str(tmp_path / "run"), "max_steps": 2, **change}))
    assert not (tmp_path / "run").exists()
