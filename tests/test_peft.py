"""Compressed experts trained with PEFT and TRL as users do: ``modules_to_save=["compressed"]`` trains
and saves exactly the vectors, the adapter loads back to the same model through PEFT's own loaders
and this library's, and the helpers count and save a PEFT model as the model it stands for."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tokens

import compressed_experts as ce

peft = pytest.importorskip("peft")


def lora(task_type: str | None = "CAUSAL_LM") -> peft.LoraConfig:
    return peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["compressed"], task_type=task_type)


def train(model, steps: int = 3, lr: float = 1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = tokens()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens(seed=1)).logits


def ce_vectors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ce.adapters.named_weights(model) if ce.layer.is_compressed_expert(n)}


@pytest.fixture
def converted_dir(tmp_path):
    """A converted tiny model saved to a directory: the base an adapter should name."""
    path = tmp_path / "converted"
    ce.from_pretrained("tiny:olmoe", n_ce=1).save_pretrained(path)
    return path


def test_modules_to_save_trains_and_saves_only_the_compressed_experts(converted_dir, tmp_path):
    model = peft.get_peft_model(ce.from_pretrained(converted_dir), lora())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        n for n in trainable if ".compressed.modules_to_save.default." in n
    }
    before = ce_vectors(model)
    train(model)
    after = ce_vectors(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every vector moved
    model.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    held = {k for k in saved if ce.layer.is_compressed_expert(k)}
    assert len(held) == len(after) == 2 * 3  # 2 blocks x ce_gate, ce_up, ce_down


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_an_adapter_on_a_saved_converted_model_loads_back_everywhere(converted_dir, tmp_path, task_type):
    trained = train(peft.get_peft_model(ce.from_pretrained(converted_dir), lora(task_type)))
    expected = logits(trained)
    trained.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")

    ours = ce.from_pretrained(adapter)
    assert isinstance(ours, peft.PeftModel) and not ours.training
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=0)
    on_base = peft.PeftModel.from_pretrained(ce.from_pretrained(converted_dir), adapter).eval()
    torch.testing.assert_close(logits(on_base), expected, rtol=0, atol=0)
    if task_type is None:
        # PEFT imports the base class the adapter records only from libraries the user allows.
        with pytest.raises(ValueError, match="import_allowlist=\\['compressed_experts"):
            peft.AutoPeftModel.from_pretrained(adapter)
        auto = peft.AutoPeftModel.from_pretrained(adapter, import_allowlist=["compressed_experts.auto_classes"])
    else:
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert ce.ce_config_of(auto.get_base_model()) == ce.CEConfig(1)
    torch.testing.assert_close(logits(auto.eval()), expected, rtol=0, atol=0)


def test_an_adapter_on_a_model_converted_in_memory_warns_and_needs_its_n_ce(tmp_path):
    plain = tmp_path / "plain"
    ce.tiny_model("olmoe").save_pretrained(plain)
    model = peft.get_peft_model(ce.from_pretrained(plain, n_ce=1), lora())
    with pytest.warns(UserWarning, match="converted in memory.*AutoPeftModelForCausalLM would load it without"):
        train(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ce.CheckpointError, match="names the plain model .* give the n_ce") as err:
        ce.from_pretrained(tmp_path / "adapter")
    assert err.value.settings == ("n_ce",)
    torch.testing.assert_close(logits(ce.from_pretrained(tmp_path / "adapter", n_ce=1)), expected, rtol=0, atol=0)
    with pytest.raises(ce.CheckpointError, match="do not fit"):  # trained with n_ce=1: its vectors, not n_ce=2's
        ce.from_pretrained(tmp_path / "adapter", n_ce=1, form="slim", r=2)


def test_the_form_and_r_of_an_adapter_are_read_from_its_weights(tmp_path):
    plain = tmp_path / "plain"
    ce.tiny_model("olmoe").save_pretrained(plain)
    model = peft.get_peft_model(ce.from_pretrained(plain, n_ce=1, form="slim", r=3), lora())
    with pytest.warns(UserWarning, match="converted in memory"):
        train(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = ce.from_pretrained(tmp_path / "adapter", n_ce=1)
    assert ce.ce_config_of(loaded.get_base_model()) == ce.CEConfig(1, form="slim", r=3)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_helpers_see_a_peft_model_as_the_model_it_stands_for(converted_dir, tmp_path):
    base = ce.from_pretrained(converted_dir)
    counts = ce.active_parameters(base)
    model = train(peft.get_peft_model(ce.from_pretrained(converted_dir), lora()))
    assert ce.active_parameters(model) == counts  # LoRA weights and PEFT's frozen copies not counted
    ce.save_compressed_experts(model, tmp_path / "vectors.safetensors")
    applied = ce.apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "vectors.safetensors")
    trained = ce_vectors(model)
    assert ce_vectors(applied).keys() == trained.keys()
    assert all(torch.equal(ce_vectors(applied)[n], trained[n]) for n in trained)  # the adapter's, not the originals


def test_the_tokenizer_of_an_adapter_is_its_base_models(tmp_path):
    base = tmp_path / "base"
    ce.tiny_model("olmoe").save_pretrained(base)
    ce.tiny_tokenizer().save_pretrained(base)
    model = peft.get_peft_model(ce.from_pretrained(base, n_ce=1), lora())
    model.save_pretrained(tmp_path / "adapter")
    assert ce.load_tokenizer(tmp_path / "adapter").get_vocab() == ce.tiny_tokenizer().get_vocab()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_type": "LORA"}, "names no base model"),
        ({"peft_type": "LORA", "base_model_name_or_path": "/no/such/base"}, "no such model directory"),
        (None, "not readable JSON"),
    ],
)
def test_a_broken_adapter_is_one_clear_error(tmp_path, config, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops" if config is None else json.dumps(config))
    for load in (ce.from_pretrained, ce.load_tokenizer):
        with pytest.raises(ce.CheckpointError, match=message):
            load(adapter)


def sft_config(trl, out, steps: int, lr: float, **extra):
    """A short CPU run of TRL's SFTTrainer that writes nothing but what the test saves."""
    return trl.SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        **extra,
    )


@pytest.mark.slow
def test_trl_sft_trainer_trains_and_saves_the_compressed_experts(converted_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = ce.from_pretrained(converted_dir)
    before = ce_vectors(model)
    data = Dataset.from_dict({"text": ["the cat sat on the mat and the dog ran"] * 16})
    # bf16 off: else accelerate leaves the model's forward under bfloat16 autocast after training.
    args = sft_config(trl, tmp_path / "run", steps=4, lr=1e-2, bf16=False)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=ce.tiny_tokenizer(), peft_config=lora()
    )
    trainer.train()
    trained = ce_vectors(trainer.model)
    assert all(not torch.equal(before[n], trained[n]) for n in before)
    trainer.model.save_pretrained(tmp_path / "adapter")
    loaded = ce.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(trainer.model.eval()), rtol=0, atol=0)


@pytest.mark.slow
def test_trl_on_a_bfloat16_model_warns_and_trains_once_the_vectors_are_float32(converted_dir, tmp_path):
    """TRL's SFTTrainer on bfloat16 weights (no PEFT): the vectors cannot take its steps, which it
    says; with ce.float32_compressed_experts first they move."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    data = Dataset.from_dict({"text": ["the cat sat on the mat and the dog ran"] * 8})
    moved = {}
    for fix in (False, True):
        model = ce.from_pretrained(converted_dir, dtype=torch.bfloat16)
        if fix:
            ce.float32_compressed_experts(model)
        before = ce_vectors(model)
        args = sft_config(trl, tmp_path / f"run{fix}", steps=2, lr=2e-5)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=ce.tiny_tokenizer())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        warned = any("will not move" in str(w.message) for w in caught)
        assert warned != fix
        moved[fix] = sum(int((before[n] != p).sum()) for n, p in ce_vectors(model).items())
    assert moved == {False: 0, True: moved[True]} and moved[True] > 0
