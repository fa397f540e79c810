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
