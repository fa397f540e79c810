"""Model sources: "bundled", tiny:<family>, a local directory and a hub id, resolved in one place."""

from __future__ import annotations

import pytest

import compressed_experts as ce
from compressed_experts import sources
from compressed_experts.sources import BUNDLED, BUNDLED_DIR, is_hub_id, local_dir, local_path, resolve, tiny_family


def test_bundled_resolves_to_the_packaged_model_unless_a_local_folder_has_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert BUNDLED_DIR.name == "bundled_model" and (BUNDLED_DIR / "config.json").is_file()
    assert resolve(BUNDLED) == str(BUNDLED_DIR)
    assert local_path(BUNDLED) == BUNDLED_DIR
    (tmp_path / BUNDLED).mkdir()
    assert resolve(BUNDLED) == BUNDLED  # a local folder of that name wins


def test_a_missing_bundled_model_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "BUNDLED_DIR", tmp_path / "gone")
    with pytest.raises(ce.CheckpointError, match="bundled model is missing.*toy pretrain --ship"):
        resolve(BUNDLED)
    with pytest.raises(ce.CheckpointError, match="bundled model is missing"):
        ce.from_pretrained(BUNDLED)
    assert local_path(BUNDLED) is None


def test_tiny_sources_name_a_family_and_no_path():
    assert tiny_family("tiny:olmoe") == "olmoe" and tiny_family("olmoe") is None
    assert resolve("tiny:olmoe") == "tiny:olmoe"
    assert local_dir("tiny:olmoe") is None and local_path("tiny:olmoe") is None
    assert type(ce.from_pretrained("tiny:olmoe")).__name__ == "OlmoeForCausalLM"
    with pytest.raises(ce.CompressedExpertsError, match="unknown model family"):
        ce.from_pretrained("tiny:llama")


def test_directories_and_hub_ids(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    assert resolve(model) == str(model)  # paths are accepted as well as strings
    assert local_dir(str(model)) == model and local_dir(str(tmp_path), "m") == model
    assert local_dir(str(tmp_path / "missing")) is None
    assert local_path(str(model)) == model and local_path(str(tmp_path / "missing")) is None
    assert is_hub_id("allenai/OLMoE-1B-7B-0924") and not is_hub_id("a/b/c") and not is_hub_id("olmoe")
    assert local_path("allenai/OLMoE-1B-7B-0924") is None  # not on this machine: nothing to overwrite
    with pytest.raises(ce.CheckpointError, match="no such model directory"):
        ce.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.parametrize("bad", [3, None, ["tiny:olmoe"]])
def test_a_source_of_the_wrong_type_is_refused(bad):
    with pytest.raises(ce.CompressedExpertsError, match="source must be a directory, a hub id or tiny:<family>"):
        resolve(bad)
    with pytest.raises(ce.CompressedExpertsError, match="source must be a directory"):
        ce.from_pretrained(bad)
    assert local_path(bad) is None
