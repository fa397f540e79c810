"""The command line: convert and info, and one-line errors for user mistakes."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app
from conftest import tokens

runner = CliRunner()


def test_convert_then_info(tmp_path):
    out = tmp_path / "olmoe-ce"
    result = runner.invoke(app, ["convert", "tiny:olmoe", "--n-ce", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging directory cleaned up
    model = ce.from_pretrained(out)
    with torch.no_grad():
        expected = ce.from_pretrained("tiny:olmoe", n_ce=4)(tokens()).logits
        assert torch.equal(model(tokens()).logits, expected)
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("OLMoE", "64", "active saving", "compressed experts"):
        assert text in result.output
    assert "│ n ce                         │       4 │" in result.output


def test_convert_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "1", "--out", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "keep.txt").exists()


def test_user_mistakes_are_one_line_errors(tmp_path):
    cases = [
        (["convert", "tiny:olmoe", "--n-ce", "8", "--out", str(tmp_path / "x")], "smaller than the model's top-k (8)"),
        (["info", str(tmp_path / "missing")], "no such model directory"),
        (["info", "tiny:llama"], "unknown model family"),
        (["convert", "tiny:olmoe", "--n-ce", "1", "--out", str(tmp_path / "y"), "--dtype", "int8"], "--dtype must be"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and message in " ".join(result.output.split())
        assert "Traceback" not in result.output
