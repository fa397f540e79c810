"""Fine-tuning: each method learns, saves and loads back, resumes after a kill, runs under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, tokens, write_arithmetic

import compressed_experts as ce
from compressed_experts.text import load_records
from compressed_experts.training import TrainConfig, TrainingDiverged, train
from compressed_experts.training.data import build_dataset


@pytest.fixture
def data(tmp_path) -> Path:
    return write_arithmetic(tmp_path / "data.jsonl")


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "top-m", "ce"])
def test_each_method_learns_and_loads_back(tmp_path, data, method):
    out = tmp_path / method
    result = train(TrainConfig(data=str(data), out=str(out), method=method, max_steps=25, **FAST))
    curve = losses(out)
    assert len(curve) == 25 and sum(curve[-5:]) / 5 < curve[0] - 0.5, curve
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 25 and summary["tokens"] == 25 * 4 * 64
    assert summary["final_loss"] == pytest.approx(curve[-1])
    expected_n_ce = {"full": 0, "top-m": 4, "ce": 4}[method]  # default: half of OLMoE's top-8
    assert summary["n_ce"] == expected_n_ce
    assert (summary["active_parameters"] < summary["active_full_topk"]) == (method != "full")
    assert not (out / "checkpoints").exists()  # removed once the final model is saved
    loaded = ce.from_pretrained(out)
    assert ce.ce_config_of(loaded) == (
        None if method == "full" else ce.CEConfig(4, "ia3" if method == "ce" else "none")
    )
    ids = tokens()
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    assert ce.load_tokenizer(out)("Add 1").input_ids == ce.tiny_tokenizer()("Add 1").input_ids
    if method == "ce":  # the vectors did train
        vectors = [p for n, p in loaded.named_parameters() if n.endswith("ce_gate")]
        assert all((v - 1).abs().max() > 1e-4 for v in vectors)


@pytest.mark.slow
def test_trainable_ce_trains_only_the_vectors_and_saves_them_alone(tmp_path, data):
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(data), out=str(out), trainable="ce", max_steps=10, **FAST))
    base = ce.tiny_model("olmoe")  # tiny:olmoe is built with seed 0: the run's starting weights
    trained = dict(result.model.named_parameters())
    for name, param in base.named_parameters():
        if name in trained:
            assert torch.equal(param, trained[name]), name
    vectors = out / "compressed_experts.safetensors"
    assert vectors.stat().st_size < (out / "model.safetensors").stat().st_size / 10
    applied = ce.apply_compressed_experts(base, vectors)
    ids = tokens()
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(applied(ids).logits, result.model(ids).logits)
    with pytest.raises(ce.CheckpointError, match="trained on a olmoe model; this one is mixtral"):
        ce.apply_compressed_experts(ce.tiny_model("mixtral"), vectors)


@pytest.mark.slow
def test_ce_lr_moves_the_vectors_further(tmp_path, data):
    def drift(ce_lr):
        model = train(
            TrainConfig(
                data=str(data), out=str(tmp_path / str(ce_lr)), trainable="ce", max_steps=5, ce_lr=ce_lr, **FAST
            )
        ).model
        return max((p - 1).abs().max().item() for n, p in model.named_parameters() if ".ce_" in n)

    assert drift(3e-2) > 3 * drift(None)


KILL_AT = 5
_KILLED_RUN = """
import os, signal, sys
from compressed_experts.training import TrainConfig, train
from compressed_experts.training.trainer import CETrainer

step = CETrainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as with a lost machine
    return step(self, *args, **kwargs)
CETrainer.training_step = training_step
train(TrainConfig(**{config}))
"""


@pytest.mark.slow
def test_resume_after_a_kill_ends_at_the_same_loss(tmp_path, data):
    settings = dict(data=str(data), max_steps=8, save_steps=2, **FAST)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **settings)).summary
    out = tmp_path / "killed"
    script = _KILLED_RUN.format(kill_at=KILL_AT, config=repr({**settings, "out": str(out)}))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "training_summary.json").exists()
    with pytest.raises(ce.CompressedExpertsError, match="already holds files"):
        train(TrainConfig(out=str(out), **settings))
    with pytest.raises(ce.CompressedExpertsError, match=r"other settings .* lr: 0.003 -> 0.001"):
        train(TrainConfig(out=str(out), resume=True, **{**settings, "lr": 1e-3}))
    resumed = train(TrainConfig(out=str(out), resume=True, **settings)).summary
    steps = [e["step"] for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == list(range(1, 9))  # the steps run again after the resume are logged once
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 8
    # Same data order, RNG and weights after the resume: equal up to float32 summation order.
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert losses(out)[-3:] == pytest.approx(losses(tmp_path / "whole")[-3:], rel=1e-5)
    with pytest.raises(ce.CompressedExpertsError, match="already finished"):
        train(TrainConfig(out=str(out), resume=True, **settings))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    from transformers import Trainer

    original = Trainer.compute_loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 3 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="became nan at step 4.*checkpoint-2"):
        train(TrainConfig(data=str(data), out=str(out), max_steps=8, save_steps=2, **FAST))
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "training_summary.json").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(method="full", n_ce=2), "method full runs all top-k experts"),
        (dict(method="ce", n_ce=0), "n_ce=0 with method ce is full top-k"),
        (dict(method="ce", n_ce=8), r"n_ce=8 must be smaller than the model's top-k \(8\)"),
        (dict(method="top-m", trainable="ce"), "top-m has no compressed experts"),
        (dict(method="full", trainable="ce+router"), "method full has no compressed experts"),
        (dict(method="top-m", ce_lr=1e-3), "method top-m has none"),
        (dict(method="lora"), "method must be one of full, top-m, ce"),
        (dict(seq_len=4096), r"seq_len 4096 is longer than the model takes \(128 positions\)"),
        (dict(warmup=1.5), "warmup is a fraction"),
        (dict(resume=True, overwrite=True), "choose one"),
        (dict(prompt="chat"), "no chat template; use prompt alpaca"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, data, change, message):
    with pytest.raises(ce.CompressedExpertsError, match=message):
        train(TrainConfig(**{**FAST, "data": str(data), "out": str(tmp_path / "run"), "max_steps": 2, **change}))
    assert not (tmp_path / "run").exists()


def test_bad_data_fails_before_training(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "folder").mkdir()
    cases = [
        (empty, "holds no records"),
        (wrong, "has the fields question, answer; expected instruction"),
        (tmp_path / "missing.jsonl", "no such data file"),
        (tmp_path / "folder", "give a .json, .jsonl or .parquet file"),
    ]
    for path, message in cases:
        with pytest.raises(ce.CompressedExpertsError, match=message):
            train(TrainConfig(**{**FAST, "data": str(path), "out": str(tmp_path / "run"), "max_steps": 2}))
    assert not (tmp_path / "run").exists()
    one = load_records(str(write_arithmetic(tmp_path / "one.jsonl", n=1)))
    with pytest.raises(ce.CompressedExpertsError, match=r"holds \d+ tokens, fewer than one packed sequence of 4096"):
        build_dataset(one, ce.tiny_tokenizer(), seq_len=4096)


def test_overwrite_replaces_a_run_but_not_foreign_files(tmp_path, data):
    out = tmp_path / "run"
    settings = dict(data=str(data), out=str(out), max_steps=2, **FAST)
    train(TrainConfig(**settings))
    train(TrainConfig(overwrite=True, **settings))
    assert len(losses(out)) == 2  # the old log went with the old run
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("meow")
    with pytest.raises(ce.CompressedExpertsError, match="not a run or a model; not deleting them"):
        train(TrainConfig(**{**settings, "out": str(foreign), "overwrite": True}))
    assert (foreign / "cat.jpg").exists()


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(tmp_path, data):
    """gloo on CPU: two processes of batch 1 see the same global batch as one process of batch 2."""
    common = [
        "--model",
        "tiny:olmoe",
        "--data",
        str(data),
        "--seq-len",
        "64",
        "--lr",
        "3e-3",
        "--warmup",
        "0",
        "--max-steps",
        "6",
        "--logging-steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = train(
        TrainConfig(data=str(data), out=str(tmp_path / "one"), max_steps=6, **{**FAST, "batch_size": 2})
    ).summary
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "compressed_experts",
        "train",
        *common,
        "--batch-size",
        "1",
        "--out",
        str(tmp_path / "two"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert two["tokens"] == single["tokens"] == 6 * 2 * 64
    # The summary says how the run was distributed: two processes of batch 1, one of batch 2.
    assert (two["world_size"], two["global_batch"], two["distributed"]) == (2, 2, "MULTI_CPU")
    assert (single["world_size"], single["global_batch"], single["distributed"]) == (1, 2, "NO")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_non_finite_gradients_stop_the_run_even_with_a_finite_loss(tmp_path, data, monkeypatch):
    from compressed_experts.training.trainer import CETrainer

    step = CETrainer.training_step

    def poisoned(self, model, *args, **kwargs):
        if self.state.global_step == 2 and not getattr(self, "_poisoned", False):
            self._poisoned = True
            model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
        return step(self, model, *args, **kwargs)

    monkeypatch.setattr(CETrainer, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match="gradients became NaN or infinite at step 3.*checkpoint-2"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=6, save_steps=2, **FAST))


def test_resuming_keeps_float32_compressed_experts_of_a_bfloat16_model(tmp_path):
    from transformers import TrainingArguments

    from compressed_experts.training.trainer import CETrainer

    model = ce.from_pretrained("tiny:olmoe", n_ce=2, dtype=torch.bfloat16)
    vectors = [p for n, p in model.named_parameters() if ".ce_" in n]
    for vec in vectors:
        vec.data = torch.full_like(vec, 1.001, dtype=torch.float32)  # as training with precision bf16 keeps them
    model.save_pretrained(tmp_path / "checkpoint-1")
    for vec in vectors:
        vec.data.fill_(1.0)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpts"), use_cpu=True, report_to="none")
    CETrainer(model=model, args=args)._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    assert all(v.dtype == torch.float32 and torch.all(v == torch.tensor(1.001)) for v in vectors)


def test_overwrite_deletes_nothing_when_another_check_fails(tmp_path, data):
    out = tmp_path / "run"
    settings = dict(data=str(data), out=str(out), max_steps=2, **FAST)
    train(TrainConfig(**settings))
    with pytest.raises(ce.CompressedExpertsError, match="no such data file"):
        train(TrainConfig(**{**settings, "data": str(tmp_path / "typo.jsonl"), "overwrite": True}))
    assert (out / "training_summary.json").is_file()
    with pytest.raises(ce.CompressedExpertsError, match="overlaps the model"):
        train(TrainConfig(**{**settings, "model": str(out), "overwrite": True}))
    assert (out / "model.safetensors").is_file()


def test_dense_models_and_broken_records_are_refused_before_training(tmp_path, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ce.UnsupportedModelError, match="supported"):
        train(
            TrainConfig(
                **{
                    **FAST,
                    "model": str(tmp_path / "dense"),
                    "data": str(data),
                    "out": str(tmp_path / "r"),
                    "method": "full",
                }
            )
        )
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        json.dumps({"instruction": "Add 1 and 2.", "output": "3"})
        + "\n"
        + json.dumps({"instruction": "Add 2 and 2.", "output": None})
        + "\n"
    )
    with pytest.raises(ce.CompressedExpertsError, match="lacks its instruction or output/response text"):
        train(TrainConfig(**{**FAST, "data": str(broken), "out": str(tmp_path / "r")}))
    with pytest.raises(ce.CompressedExpertsError, match="save_steps is a whole number"):
        TrainConfig(**{**FAST, "data": str(data), "out": str(tmp_path / "r"), "save_steps": 1.5})
    assert not (tmp_path / "r").exists()
