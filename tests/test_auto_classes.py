"""Saved compressed-experts directories through transformers' Auto classes (after importing the
library), and a config.json that no tool can mistake for its base family."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import assert_same_logits, compressed_layers, randomise_compressed_experts, tokens
from transformers import AutoConfig, AutoModelForCausalLM

import compressed_experts as ce


@pytest.fixture
def saved(tmp_path, family):
    model = ce.convert(ce.tiny_model(family), ce.CEConfig(1))
    randomise_compressed_experts(model)
    model.save_pretrained(tmp_path / "model")
    ce.tiny_tokenizer().save_pretrained(tmp_path / "model")
    with torch.no_grad():
        return tmp_path / "model", model.eval()(tokens()).logits


def test_auto_classes_load_the_compressed_experts_model(saved, family):
    directory, logits = saved
    config = AutoConfig.from_pretrained(directory)
    assert config.compressed_experts["n_ce"] == 1 and config.model_type == family
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert ce.ce_config_of(model) == ce.CEConfig(1)
    assert type(model).__name__ == type(ce.from_pretrained(directory)).__name__  # the family's own class
    with torch.no_grad():
        assert_same_logits(model(tokens()).logits, logits)


def test_config_json_names_an_architecture_of_its_own(saved):
    directory, _ = saved
    saved_config = json.loads((directory / "config.json").read_text())
    assert saved_config["model_type"] == "compressed_experts"
    (name,) = saved_config["architectures"]
    assert name.startswith("CompressedExperts") and name.endswith("ForCausalLM")
    # Saved again after loading: the name is not prefixed twice.
    again = directory.parent / "again"
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(again)
    assert json.loads((again / "config.json").read_text())["architectures"] == [name]


def test_lm_eval_loads_a_saved_directory_by_path(saved):
    from lm_eval.models.huggingface import HFLM

    directory, logits = saved
    lm = HFLM(pretrained=str(directory), device="cpu", batch_size=1)
    layers = compressed_layers(lm.model)
    assert layers and all(layer.n_ce == 1 for layer in layers)
    with torch.no_grad():  # the trained vectors came with it, not fresh ones
        assert_same_logits(lm.model.float().eval()(tokens()).logits, logits)


def test_the_config_class_reads_its_own_directory_as_auto_config_does(saved, family, caplog):
    """PEFT re-reads the base's config with ``type(model.config).from_pretrained`` when it saves an
    adapter: that gives the same config, without transformers' warning about another model type."""
    directory, _ = saved
    loaded = ce.from_pretrained(directory)
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)  # transformers' loggers do not propagate to the root
    try:
        again = type(loaded.config).from_pretrained(directory)
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "instantiate a model" in r.getMessage()]
    assert again.model_type == family and again.compressed_experts == loaded.config.compressed_experts
    assert {**again.to_dict(), "_name_or_path": ""} == {**loaded.config.to_dict(), "_name_or_path": ""}
