"""One output policy and one staged save for every command that writes a model or a run, and
calibration text that the caller always names."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import FAST, write_arithmetic
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.checkpoint import check_output_dir, save_model, staged_save, staging_dir, write_atomic
from compressed_experts.cli import app
from compressed_experts.fit import calibration_blocks
from compressed_experts.sources import BUNDLED, BUNDLED_DIR
from compressed_experts.training import TrainConfig, train

runner = CliRunner()


def _convert(source, out, *extra):
    result = runner.invoke(app, ["convert", str(source), "--n-ce", "1", "--out", str(out), *extra])
    return result.exit_code, " ".join(result.output.split())


def _train(tmp_path, out, **change):
    settings = {**FAST, "data": str(write_arithmetic(tmp_path / "data.jsonl", n=8)), "out": str(out), "max_steps": 1}
    with pytest.raises(ce.CompressedExpertsError) as caught:
        train(TrainConfig(**{**settings, **change}))
    return caught.value.args[0]


def test_check_output_dir_says_what_must_be_replaced(tmp_path):
    assert check_output_dir(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") is False
    save_model(ce.tiny_model("mixtral"), tmp_path / "model")  # the library's save: with its marker
    assert check_output_dir(tmp_path / "model", overwrite=True) is True
    with pytest.raises(ce.CompressedExpertsError, match="is not empty .*pass overwrite"):
        check_output_dir(tmp_path / "model")
    assert check_output_dir(tmp_path / "model", keep=True) is False  # continued, not replaced
    with pytest.raises(ce.CompressedExpertsError, match="is the source model itself"):
        check_output_dir(tmp_path / "model", overwrite=True, sources={"source model": str(tmp_path / "model")})
    with pytest.raises(ce.CompressedExpertsError, match="overlaps the data"):
        check_output_dir(tmp_path, sources={"data": str(tmp_path / "model" / "config.json")})
    with pytest.raises(ce.CompressedExpertsError, match="is the source model itself"):
        check_output_dir(BUNDLED_DIR, overwrite=True, sources={"source model": BUNDLED})  # "bundled" is a folder too
    # Sources that are not on this machine cannot be overwritten: nothing to check.
    assert (
        check_output_dir(tmp_path / "new", sources={"model": "tiny:olmoe", "data": "org/name", "tokenizer": None})
        is False
    )


def test_convert_and_train_refuse_the_same_outputs(tmp_path, monkeypatch):
    """The CLI's convert (and fit) and the library's train apply one policy: the same refusals."""
    model = tmp_path / "model"
    ce.tiny_model("olmoe").save_pretrained(model)
    ce.tiny_tokenizer().save_pretrained(model)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    cases = [
        (foreign, [], "is not empty"),
        (foreign, ["--overwrite"], "not deleting them"),
        (model, ["--overwrite"], "is the source model itself"),
        (model / "sub", [], "overlaps the source model"),
        (foreign / "cat.jpg", [], "is a file"),
    ]
    for out, extra, message in cases:
        code, text = _convert(model, out, *extra)
        assert code == 2 and message in text, text
        said = _train(tmp_path, out, model=str(model), overwrite=bool(extra))
        assert message.replace("source model", "model") in said, said
    assert (foreign / "cat.jpg").read_text() == "meow" and (model / "config.json").is_file()
    monkeypatch.chdir(foreign)
    for out in (foreign, tmp_path):  # the working directory, or a folder above it
        code, text = _convert("tiny:olmoe", out, "--overwrite")
        assert code == 2 and "working directory or above it" in text, text
        assert "working directory or above it" in _train(tmp_path, out, overwrite=True)
    assert (foreign / "cat.jpg").read_text() == "meow"


def test_the_toy_recipe_applies_the_same_policy(tmp_path):
    from compressed_experts.toy.pretrain import Recipe, pretrain

    (tmp_path / "keep.txt").write_text("mine")
    small = Recipe(max_files=1, max_steps=1)
    with pytest.raises(ce.CompressedExpertsError, match="is not empty.*use resume"):
        pretrain(tmp_path, small)
    with pytest.raises(ce.CompressedExpertsError, match="only replaces a toy pretraining directory.*not deleting them"):
        pretrain(tmp_path, small, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


class _Exploding(torch.nn.Module):
    """A model whose save fails half-way, after writing part of its files."""

    def save_pretrained(self, directory):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")


def test_a_failed_save_leaves_the_earlier_model_and_no_staging_folder(tmp_path):
    out = tmp_path / "model"
    save_model(ce.tiny_model("mixtral"), out, tokenizer=ce.tiny_tokenizer(), extra_files={"note.txt": "first"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "note.txt"} <= set(before)

    with pytest.raises(OSError, match="disk full"):
        save_model(_Exploding(), out, extra_files={"note.txt": "second"})

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("tokenizer broke")

    with pytest.raises(RuntimeError, match="tokenizer broke"):
        save_model(ce.tiny_model("mixtral"), out, tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind


def test_a_save_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "model"
    save_model(ce.tiny_model("mixtral"), out, extra_files={"old.txt": "x"})
    converted = ce.from_pretrained("tiny:mixtral", n_ce=1)
    save_model(converted, out, extra_files={"report.json": json.dumps({"a": 1}), "raw.bin": b"\x00\x01"})
    assert not (out / "old.txt").exists() and (out / "raw.bin").read_bytes() == b"\x00\x01"
    assert ce.ce_config_of(ce.from_pretrained(out)) == ce.CEConfig(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # staged_save can also merge into a directory that keeps its other files (a run's final model).
    with staged_save(out, merge=True) as staging:
        assert staging == staging_dir(out)
        (staging / "summary.json").write_text("{}")
    assert (out / "summary.json").is_file() and (out / "raw.bin").is_file()
    write_atomic(out / "summary.json", "[1]")
    assert (out / "summary.json").read_text() == "[1]" and not list(out.glob(".*"))


def test_calibration_text_must_be_named(tmp_path):
    tokenizer = ce.tiny_tokenizer()
    with pytest.raises(ce.CompressedExpertsError, match="no calibration text: pass a .txt.*list of strings"):
        calibration_blocks(tokenizer, None)
    with pytest.raises(ce.CompressedExpertsError, match="no calibration text"):
        ce.calibration_blocks(tokenizer)
    with pytest.raises(ce.CompressedExpertsError, match="must all be strings"):
        calibration_blocks(tokenizer, ["text", 3])
    with pytest.raises(ce.CompressedExpertsError, match="given as a list holds no text"):
        calibration_blocks(tokenizer, ["", "  "])
    texts = [(f"def f{i}(x):\n    return x * {i}\n" * 4).strip() for i in range(40)]
    kept = list(texts)
    blocks = calibration_blocks(tokenizer, texts, seq_len=64, tokens=512, seed=1)
    assert blocks.shape == (8, 64) and texts == kept  # the caller's list is not shuffled
    (tmp_path / "c.txt").write_text("\n\n".join(texts))
    assert torch.equal(blocks, calibration_blocks(tokenizer, tmp_path / "c.txt", seq_len=64, tokens=512, seed=1))


def test_the_fit_command_calibrates_on_the_bundled_corpus_by_default(tmp_path):
    out = tmp_path / "fitted"
    result = runner.invoke(
        app,
        ["fit", "tiny:olmoe", "--n-ce", "2", "--seq-len", "32", "--tokens", "64", "--steps", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fit_report.json").read_text())
    assert report["calibration"] == "bundled held-out corpus" and report["calibration_tokens"] == 64
    assert ce.load_tokenizer(out)("ab").input_ids  # the tokenizer went along


def test_a_saved_model_directory_gets_the_usual_permissions(tmp_path):
    """The staged save used to be a mkdtemp folder (mode 0700); save_pretrained and train give 0755."""
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    umask = os.umask(0)
    os.umask(umask)
    save_model(model, tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
