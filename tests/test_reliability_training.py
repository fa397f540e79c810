"""Issue 19, section 3: a training run that produced a broken model does not end as a success.

Each case an adversarial user found is a test here: settings that are not finite, checkpoints
of NaN weights, binary text, the summary after a resumption, a kill during the final save,
data changed under a resumption, and a damaged newest checkpoint.
"""

from __future__ import annotations

import json
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


# -- resumption: the same run, the whole run's summary, a kill during the final save, damage ---------


class Killed(Exception):
    """Stands for a kill: nothing after it runs (the Trainer cleans up nothing on an exception)."""


def kill_at_step(monkeypatch, step: int) -> None:
    """The run dies as step ``step`` (1-based) begins: checkpoints before it stay, as after a SIGKILL."""
    original = CETrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise Killed(f"killed at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CETrainer, "training_step", training_step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(the data, the settings of a 6-step run checkpointed every 2 steps, its uninterrupted summary)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_arithmetic(root / "data.jsonl")
    run = settings(data, root / "whole", max_steps=6, save_steps=2)
    return data, run, train(TrainConfig(**run)).summary


def killed_run(tmp_path, reference, monkeypatch, step: int, **change) -> dict:
    """The settings of the reference run in ``tmp_path / "killed"``, killed as step ``step`` began."""
    run = {**reference[1], "out": str(tmp_path / "killed"), **change}
    with monkeypatch.context() as patch:
        kill_at_step(patch, step)
        with pytest.raises(Killed):
            train(TrainConfig(**run))
    return run


@pytest.mark.slow
def test_the_summary_after_a_resumption_is_the_whole_runs(tmp_path, reference, monkeypatch):
    whole = reference[2]
    run = killed_run(tmp_path, reference, monkeypatch, step=5)
    resumed = train(TrainConfig(**{**run, "resume": True})).summary
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["steps"] == whole["steps"] == 6 and resumed["tokens"] == whole["tokens"] == 6 * 4 * 64
    # train_loss averaged only steps 5-6 before; now all six, as the uninterrupted run's.
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert resumed["seconds"] > 0


@pytest.mark.slow
def test_a_kill_during_the_final_save_resumes_without_an_extra_step(tmp_path, reference, monkeypatch):
    import compressed_experts.training.run as run_module

    whole, out = reference[2], tmp_path / "run"
    run = {**reference[1], "out": str(out), "keep_checkpoints": True}
    original = run_module.commit_staged

    def killed_after_moving_the_model(staging, target, **kwargs):  # the summary is never written
        original(staging, target, **kwargs)
        raise Killed("killed during the final save")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "commit_staged", killed_after_moving_the_model)
        with pytest.raises(Killed):
            train(TrainConfig(**run))
    assert (out / "model.safetensors").is_file() and not (out / "training_summary.json").exists()
    resumed = train(TrainConfig(**{**run, "resume": True})).summary
    # It reported steps 7, one more step's tokens and that step's loss before.
    assert resumed["steps"] == 6 and resumed["tokens"] == whole["tokens"] == 6 * 4 * 64
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert max(steps) == 6
    saved = ce.from_pretrained(out)
    expected = ce.from_pretrained(out / "checkpoints" / "checkpoint-6")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), expected.state_dict().values()))


@pytest.mark.slow
def test_resuming_on_changed_data_is_refused(tmp_path, reference, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_bytes(reference[0].read_bytes())
    run = killed_run(tmp_path, reference, monkeypatch, step=3, data=str(data))
    data.write_bytes(data.read_bytes().replace(b"Add", b"Sum", 1))  # same path, same size, other content
    with pytest.raises(ce.CompressedExpertsError, match=r"not the same run .* the data's content changed") as err:
        train(TrainConfig(**{**run, "resume": True}))
    assert err.value.settings == ("resume", "data")
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-2").is_dir()  # nothing was touched
    data.write_bytes(reference[0].read_bytes())
    assert train(TrainConfig(**{**run, "resume": True})).summary["steps"] == 6


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, monkeypatch):
    import shutil

    whole = reference[2]
    run = killed_run(tmp_path, reference, monkeypatch, step=5)
    for damage in ("optimizer.pt", "rng_state.pth", "model.safetensors"):
        out = tmp_path / damage
        shutil.copytree(tmp_path / "killed", out)
        broken = out / "checkpoints" / "checkpoint-4" / damage
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # cut short, as by a full disk
        with pytest.warns(RuntimeWarning, match=rf"checkpoint-4 is damaged \({damage} has \d+ bytes.*checkpoint-2"):
            resumed = train(TrainConfig(**{**run, "out": str(out), "resume": True})).summary
        assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 6
        assert list(resumed["damaged_checkpoints"]) == ["damaged-checkpoint-4"]
        assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
        assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    # Nothing good left: refused, saying what is wrong with each, and nothing is moved.
    out = tmp_path / "all-damaged"
    shutil.copytree(tmp_path / "killed", out)
    (out / "checkpoints" / "checkpoint-4" / "optimizer.pt").unlink()
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{")
    with pytest.raises(ce.CompressedExpertsError, match=r"every one is damaged; checkpoint-4: optimizer.pt is missing"):
        train(TrainConfig(**{**run, "out": str(out), "resume": True}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
