"""The command line: convert and info, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import re

import torch
from conftest import tokens, write_arithmetic
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app

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
    assert re.search(r"n ce\s*│\s*4\s*│", result.output)
    assert re.search(r"expert-equivalents per token\s*│\s*4\.\d\d of 8\s*│", result.output)
    slim = tmp_path / "slim"
    assert (
        runner.invoke(
            app, ["convert", "tiny:olmoe", "--n-ce", "4", "--form", "slim", "--r", "4", "--out", str(slim)]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["info", str(slim)])
    assert re.search(r"\br\s*│\s*4\s*│", result.output), result.output
    assert re.search(r"expert-equivalents per token\s*│\s*5\.00 of 8\s*│", result.output), result.output  # 4 + 4 * 4/16
    # Each of the 64 experts of both MoE blocks gets its slim copy: r = 4 neurons, 3 H x r weights (H = 32).
    assert ce.active_parameters(ce.from_pretrained(slim))["added"] == 2 * 64 * 3 * 32 * 4
    assert re.search(r"parameters added by the form\s*│\s*49,152\s*│", result.output), result.output


def test_convert_never_destroys_what_is_not_a_model(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "1", "--out", str(tmp_path), *extra])
        assert result.exit_code == 2
        assert (tmp_path / "keep.txt").read_text() == "mine"
    assert "only replaces a model directory" in " ".join(result.output.split())


def test_overwrite_replaces_an_earlier_model(tmp_path):
    out = tmp_path / "model"
    assert runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "1", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "2", "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(app, ["convert", "tiny:mixtral", "--n-ce", "2", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert ce.ce_config_of(ce.from_pretrained(out)) == ce.CEConfig(2)


def test_info_on_a_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "has no MoE blocks" in " ".join(result.output.split())


def test_user_mistakes_are_one_line_errors(tmp_path):
    cases = [
        (["convert", "tiny:olmoe", "--n-ce", "8", "--out", str(tmp_path / "x")], "smaller than the model's top-k (8)"),
        (["info", str(tmp_path / "missing")], "no such model directory"),
        (["info", "tiny:llama"], "unknown model family"),
        (["convert", "tiny:olmoe", "--n-ce", "1", "--out", str(tmp_path / "y"), "--dtype", "int8"], "--dtype must be"),
        (["convert", "tiny:olmoe", "--n-ce", "1", "--out", str(tmp_path / "file.txt")], "is a file"),
        (["bench", "--shapes", "gpt"], "unknown value(s) gpt"),
        (["bench", "--repeats", "2"], "at least 5"),
        (["bench", "--tokens", "x"], "comma-separated list of int"),
        (["bench", "--tokens", "0,16"], "must be positive"),
        (["bench", "--shapes", "none", "--no-end-to-end"], "measures nothing"),
        (["bench", "--doc", str(tmp_path / "nowhere" / "B.md")], "does not exist"),
        (
            ["bench", "--report-only", "--out-dir", str(tmp_path / "none"), "--doc", str(tmp_path / "B.md")],
            "no benchmark results",
        ),
        (
            ["demo", "--math-steps", "0", "--out", str(tmp_path / "demo")],
            "demo settings must be positive: --math-steps=0",
        ),
    ]
    (tmp_path / "file.txt").write_text("x")
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and message in " ".join(result.output.split())
        assert "Traceback" not in result.output


def test_library_errors_name_the_flags(tmp_path):
    """The library says n_ce (tests/test_checkpoint.py); the CLI shows the setting as its flag."""
    result = runner.invoke(app, ["convert", "tiny:olmoe", "--n-ce", "8", "--out", str(tmp_path / "x")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "error: --n-ce=8 must be smaller than the model's top-k (8)" in text, text
    assert "use --n-ce between 0 and 7" in text and "n_ce" not in text, text
    assert not (tmp_path / "x").exists()


def test_train_command_runs_and_summarises(tmp_path):
    data = write_arithmetic(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        "tiny:olmoe",
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "top-m",
        "--n-ce",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--no-gradient-checkpointing",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in ("top-m", "final loss", "active parameters per token"):
        assert expected in text
    assert ce.ce_config_of(ce.from_pretrained(out)) == ce.CEConfig(2, "none")
    settings = json.loads((out / "training_config.json").read_text())
    assert settings["gradient_checkpointing"] is False and settings["lr"] == 2e-5
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "use --resume to continue it" in " ".join(again.output.split())


def test_train_command_reports_a_bad_option_in_one_line(tmp_path):
    result = runner.invoke(
        app, ["train", "--model", "tiny:olmoe", "--data", "x.jsonl", "--out", str(tmp_path / "r"), "--precision", "fp8"]
    )
    assert result.exit_code == 2
    assert "precision must be one of auto, bf16-mixed, bf16, fp32" in " ".join(result.output.split())
