"""Fully sharded data parallel (FSDP2) on two CPU processes (gloo): losses, sharding, gathered
saves and a resume after kill -9 from sharded checkpoints.

accelerate builds FSDP for accelerators only, so the Trainer cannot shard on CPU; these tests
run the library's part (compressed_experts.training.sharding) in the loop of tests/fsdp_worker.py,
and check that train() refuses an FSDP accelerate config that would silently run unsharded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, assert_same_logits, write_arithmetic

import compressed_experts as ce
from compressed_experts.training import TrainConfig, train

WORKER = Path(__file__).with_name("fsdp_worker.py")
pytestmark = pytest.mark.slow


def launch(out: Path, processes: int, *options: str, port: int) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        str(WORKER),
        str(out),
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def losses(out: Path) -> list[float]:
    return [value for _, value in sorted((int(k), v) for k, v in json.loads((out / "losses.json").read_text()).items())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process unsharded and two processes sharded, the same global batches."""
    root = tmp_path_factory.mktemp("fsdp")
    one = launch(root / "one", 1, "--no-shard", port=29561)
    two = launch(root / "two", 2, port=29562)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two"


def test_two_sharded_processes_match_one_process(runs):
    one, two = runs
    assert len(losses(two)) == 6
    # float32 reductions in another order (reduce-scatter of gradients against one backward).
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    info = json.loads((two / "info.json").read_text())
    # Compressed experts are sharded with their decoder layer, along the experts (64 -> 32 a process).
    assert info == {"sharded": True, "ce_gate_local": [32, 32], "world": 2}


def test_the_gathered_save_loads_back_as_the_trained_model(runs):
    _, two = runs
    model = ce.from_pretrained(two / "final")
    assert ce.ce_config_of(model) == ce.CEConfig(2)
    from fsdp_worker import batch

    with torch.no_grad():
        assert_same_logits(model.eval()(batch(0)[:2]).logits, torch.load(two / "probe_logits.pt"))


def test_the_vectors_file_is_gathered_from_the_shards(runs):
    one, two = runs
    base = ce.tiny_model("olmoe")
    ce.apply_compressed_experts(base, two / "vectors.safetensors")
    trained = ce.from_pretrained(two / "final")
    applied = {n: p for n, p in base.named_parameters() if ce.layer.is_compressed_expert(n)}
    expected = {n: p for n, p in trained.named_parameters() if ce.layer.is_compressed_expert(n)}
    assert applied.keys() == expected.keys() and len(applied) == 2 * 3  # 2 blocks x ce_gate, ce_up, ce_down
    for name, p in applied.items():
        assert torch.equal(p, expected[name]), name


def test_resume_after_kill_from_sharded_checkpoints_ends_where_an_uninterrupted_run_does(runs, tmp_path):
    _, two = runs
    killed = launch(tmp_path / "run", 2, "--save-every", "2", "--die-at", "5", port=29563)
    assert killed.returncode != 0  # killed at step 5, after the checkpoint of step 4
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-2", "ckpt-4"]
    assert not list((tmp_path / "run").glob(".*staging"))
    resumed = launch(tmp_path / "run", 2, "--save-every", "2", "--resume", port=29564)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Model and optimizer state (AdamW moments, sharded) came back exactly: the same losses, bit for bit.
    assert losses(tmp_path / "run") == losses(two)


def test_train_refuses_an_fsdp_config_that_accelerate_would_run_unsharded(tmp_path, monkeypatch):
    data = write_arithmetic(tmp_path / "data.jsonl")
    settings = dict(data=str(data), out=str(tmp_path / "run"), max_steps=1, **FAST)
    train(TrainConfig(**settings))  # a finished run, which the refused one must not replace
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ce.CompressedExpertsError, match="accelerate shards only on GPUs"):
        train(TrainConfig(**settings, overwrite=True))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_sharding_mistakes_are_clear_errors(tmp_path):
    run = launch(tmp_path / "misuse", 1, "--misuse", port=29565)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads((tmp_path / "misuse" / "errors.json").read_text())
    assert "build it after shard(model)" in errors["stale optimizer"]
    assert "is already sharded" in errors["sharded twice"]
    assert not (tmp_path / "misuse" / "ckpt").exists()
