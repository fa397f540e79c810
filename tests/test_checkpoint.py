"""Saving with the model's own save_pretrained and loading back with from_pretrained."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_logits, compressed_layers, randomise_compressed_experts, tokens

import compressed_experts as ce


def saved(tmp_path, family="olmoe", n_ce=2, dtype=None):
    model = ce.from_pretrained(f"tiny:{family}", n_ce=n_ce, dtype=dtype)
    randomise_compressed_experts(model)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_round_trip_gives_identical_logits(tmp_path, family):
    model, path = saved(tmp_path, family, n_ce=1)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "compressed_experts"
    assert config["compressed_experts"]["n_ce"] == 1
    assert config["compressed_experts"]["base_model_type"] == model.config.model_type
    loaded = ce.from_pretrained(path)
    # The family's class, named as a compressed-experts one (so PEFT's auto mapping records a class that converts).
    assert isinstance(loaded, type(model)) and type(loaded).__name__ == "CompressedExperts" + type(model).__name__
    assert ce.ce_config_of(loaded) == ce.CEConfig(1)
    for a, b in zip(compressed_layers(model), compressed_layers(loaded)):
        assert torch.equal(a.ce_gate, b.ce_gate) and torch.equal(a.ce_down, b.ce_down)
    ids = tokens()
    with torch.no_grad():
        assert_same_logits(loaded(ids).logits, model(ids).logits)
    # A loaded model saves again to the same format.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "compressed_experts"


def test_top_m_form_round_trip(tmp_path):
    model = ce.from_pretrained("tiny:olmoe", n_ce=4, form="none")
    model.save_pretrained(tmp_path / "top-m")
    assert json.loads((tmp_path / "top-m" / "config.json").read_text())["compressed_experts"]["form"] == "none"
    loaded = ce.from_pretrained(tmp_path / "top-m")
    assert ce.ce_config_of(loaded) == ce.CEConfig(4, "none")
    ids = tokens()
    with torch.no_grad():
        assert_same_logits(loaded(ids).logits, model(ids).logits)
    assert ce.ce_config_of(ce.from_pretrained(tmp_path / "top-m", n_ce=4)) == ce.CEConfig(
        4, "none"
    )  # repeating n_ce alone is fine
    with pytest.raises(ce.CompressedExpertsError, match="n_ce=4, form=none; got form=ia3"):
        ce.from_pretrained(tmp_path / "top-m", form="ia3")


def test_form_is_checked_before_loading():
    with pytest.raises(ce.CompressedExpertsError, match="unknown compressed-expert form 'lora'; choose from ia3, none"):
        ce.from_pretrained("no/such-model", n_ce=2, form="lora")
    with pytest.raises(ce.CompressedExpertsError, match="form=none needs n_ce"):
        ce.from_pretrained("tiny:olmoe", form="none")


def test_round_trip_in_bfloat16(tmp_path):
    model, path = saved(tmp_path, "qwen2_moe", dtype=torch.bfloat16)
    loaded = ce.from_pretrained(path, dtype=torch.bfloat16)
    assert compressed_layers(loaded)[0].ce_up.dtype == torch.bfloat16
    with torch.no_grad():
        assert_same_logits(loaded(tokens()).logits, model(tokens()).logits)


def test_transformers_without_the_library_refuses_a_compressed_checkpoint(tmp_path):
    """In a process that never imported compressed_experts, the Auto classes refuse the directory
    (naming its model type) instead of loading it as the base family; with the library imported
    they load it (tests/test_auto_classes.py)."""
    _, path = saved(tmp_path)
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(path)!r})"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "compressed_experts" in run.stderr


def test_plain_checkpoint_loads_plain_or_converted(tmp_path):
    plain = ce.tiny_model("mixtral")
    plain.save_pretrained(tmp_path / "plain")
    assert ce.ce_config_of(ce.from_pretrained(tmp_path / "plain")) is None
    converted = ce.from_pretrained(tmp_path / "plain", n_ce=3)
    assert ce.ce_config_of(converted) == ce.CEConfig(3)
    with torch.no_grad():
        reference = ce.convert(plain, ce.CEConfig(3))(tokens()).logits
        assert_same_logits(converted(tokens()).logits, reference)


def test_asking_for_another_n_ce_than_saved_is_an_error(tmp_path):
    _, path = saved(tmp_path, n_ce=2)
    with pytest.raises(
        ce.CompressedExpertsError, match="already has compressed experts with n_ce=2, form=ia3; got n_ce=3"
    ):
        ce.from_pretrained(path, n_ce=3)
    assert ce.ce_config_of(ce.from_pretrained(path, n_ce=2)) == ce.CEConfig(2)


def test_errors_name_settings_by_their_python_names():
    """Library errors say n_ce, not the CLI's --n-ce, and list the settings they name (for the CLI to map)."""
    with pytest.raises(ce.CompressedExpertsError) as caught:
        ce.from_pretrained("tiny:olmoe", n_ce=8)
    message = str(caught.value)
    assert message.startswith("n_ce=8 must be smaller than the model's top-k (8)"), message
    assert "--" not in message and caught.value.settings == ("n_ce",)


def test_n_ce_out_of_range_is_caught_before_loading(tmp_path):
    plain = ce.tiny_model("olmoe")
    plain.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"")  # loading it would fail differently
    with pytest.raises(ce.CompressedExpertsError, match=r"n_ce=8 must be smaller than the model's top-k \(8\)"):
        ce.from_pretrained(tmp_path / "plain", n_ce=8)


def test_truncated_safetensors_is_reported(tmp_path):
    _, path = saved(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ce.CheckpointError, match="truncated or corrupt"):
        ce.from_pretrained(path)


def test_corrupt_safetensors_header_is_reported(tmp_path):
    _, path = saved(tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json!!!!"
    weights.write_bytes(bytes(data))
    with pytest.raises(ce.CheckpointError, match="corrupt"):
        ce.from_pretrained(path)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_compressed_expert_count_disagreeing_with_config(tmp_path):
    _, path = saved(tmp_path)
    _edit_config(path, num_hidden_layers=3)
    with pytest.raises(ce.CheckpointError, match="compressed experts for 2 MoE blocks but its config describes 3"):
        ce.from_pretrained(path)


def test_compressed_expert_shapes_disagreeing_with_config(tmp_path):
    _, path = saved(tmp_path)
    _edit_config(path, num_experts=32)
    with pytest.raises(
        ce.CheckpointError, match=r"ce_down has shape \[64, 16\] in the checkpoint but config.json implies \[32, 16\]"
    ):
        ce.from_pretrained(path)


def test_compressed_weights_without_their_config_section(tmp_path):
    _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = config.pop("compressed_experts")["base_model_type"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ce.CheckpointError, match="no compressed_experts section"):
        ce.from_pretrained(path)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ce.CheckpointError, match="not a model directory"):
        ce.from_pretrained(tmp_path)
    with pytest.raises(ce.CheckpointError, match="is a file"):
        ce.from_pretrained(tmp_path / "notes.txt")
    with pytest.raises(ce.CheckpointError, match="no such model directory"):
        ce.from_pretrained(tmp_path / "missing")


def test_weights_missing_from_a_compressed_checkpoint(tmp_path):
    _, path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ce.CheckpointError, match="no \\*.safetensors"):
        ce.from_pretrained(path)


def test_header_that_is_json_but_not_a_safetensors_header(tmp_path):
    _, path = saved(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    fake = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [4]}}).encode().ljust(length)
    weights.write_bytes(data[:8] + fake + data[8 + length :])
    with pytest.raises(ce.CheckpointError, match="corrupt header"):
        ce.from_pretrained(path)


def test_missing_shard_is_named(tmp_path):
    model = ce.from_pretrained("tiny:olmoe", n_ce=2)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ce.CheckpointError, match=f"lacks shard.*{shards[-1].name}"):
        ce.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: [c], "not a transformers model config"),
        (lambda c: {**c, "compressed_experts": [4]}, "no base model type"),
        (
            lambda c: {**c, "compressed_experts": {**c["compressed_experts"], "format_version": "1"}},
            "bad format_version",
        ),
        (lambda c: {**c, "compressed_experts": {**c["compressed_experts"], "format_version": 99}}, "upgrade"),
        (
            lambda c: {**c, "compressed_experts": {**c["compressed_experts"], "base_model_type": "nonsense"}},
            "unknown base model type",
        ),
    ],
)
def test_odd_config_contents(tmp_path, change, message):
    _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(ce.CompressedExpertsError, match=message):
        ce.from_pretrained(path)


def test_bad_arguments():
    with pytest.raises(ce.CompressedExpertsError, match="source must be"):
        ce.from_pretrained(None)
    with pytest.raises(ce.CompressedExpertsError, match="dtype must be"):
        ce.from_pretrained("tiny:olmoe", dtype="fp16")
    with pytest.raises(ce.CompressedExpertsError, match="take only dtype"):
        ce.from_pretrained("tiny:olmoe", device_map="auto")
    with pytest.raises(ce.CheckpointError, match="no such model directory: olmoe-typo"):
        ce.from_pretrained("olmoe-typo")
    with pytest.raises(ce.CompressedExpertsError, match="loaded transformers model"):
        ce.convert(None, ce.CEConfig(1))


def test_compressed_experts_file_round_trip_and_misuse(tmp_path):
    model = ce.from_pretrained("tiny:olmoe", n_ce=2)
    randomise_compressed_experts(model)
    ce.save_compressed_experts(model, tmp_path / "v.safetensors")
    applied = ce.apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "v.safetensors")
    assert ce.ce_config_of(applied) == ce.CEConfig(2)
    ids = tokens()
    with torch.no_grad():
        assert_same_logits(applied(ids).logits, model(ids).logits)
    with pytest.raises(ce.CompressedExpertsError, match="no compressed-expert parameters to save"):
        ce.save_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "w.safetensors")
    with pytest.raises(ce.CompressedExpertsError, match="already has other compressed experts"):
        ce.apply_compressed_experts(ce.from_pretrained("tiny:olmoe", n_ce=3), tmp_path / "v.safetensors")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ce.CheckpointError, match="not a compressed-experts file"):
        ce.apply_compressed_experts(ce.tiny_model("olmoe"), tmp_path / "model" / "model.safetensors")
    bigger = ce.tiny_model("olmoe")
    bigger.config.num_hidden_layers = 3  # a model the file was not trained on: checked before converting
    with pytest.raises(ce.CheckpointError, match="does not fit this model"):
        ce.apply_compressed_experts(bigger, tmp_path / "v.safetensors")
    assert ce.ce_config_of(bigger) is None


def test_a_model_directory_without_a_tokenizer_is_said_so(tmp_path):
    ce.tiny_model("olmoe").save_pretrained(tmp_path / "m")
    with pytest.raises(ce.CheckpointError, match="no (usable )?tokenizer"):
        ce.load_tokenizer(tmp_path / "m")


def test_loading_the_tokenizer_of_a_converted_model_logs_no_model_type_warning(tmp_path):
    """AutoTokenizer reads a converted model's config.json (model_type compressed_experts). Without
    the library's registration with AutoConfig, transformers.configuration_utils warned "You are
    using a model of type `compressed_experts` to instantiate a model of type ..."; with it,
    the config reads as what it is and nothing is logged.

    transformers' stderr handler writes to the sys.stderr object of import time (under pytest,
    the session capture's stream), which capfd never reads, so the records are collected by a
    handler on that logger itself, with any filters on it taken off."""
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    model.save_pretrained(tmp_path)
    ce.tiny_tokenizer().save_pretrained(tmp_path)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    config_logger = logging.getLogger("transformers.configuration_utils")
    handler = Collect(level=logging.WARNING)
    level = config_logger.level
    config_logger.addHandler(handler)
    config_logger.setLevel(logging.WARNING)  # the warning is emitted whatever the verbosity
    try:
        with pytest.MonkeyPatch.context() as unfiltered:
            unfiltered.setattr(config_logger, "filters", [])
            # The same warning path, shown to be live: a config read as another type logs it.
            from transformers import OlmoeConfig

            other = tmp_path / "other"
            other.mkdir()
            (other / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
            OlmoeConfig.from_pretrained(other)
            assert any("model of type `mixtral` to instantiate" in m for m in messages), messages
            messages.clear()
            assert ce.load_tokenizer(tmp_path)("ab").input_ids
        assert not [m for m in messages if "compressed_experts" in m], messages
    finally:
        config_logger.removeHandler(handler)
        config_logger.setLevel(level)
