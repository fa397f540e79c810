"""``bench --engine vllm``: the three variants of a model served by vLLM, timed side by side in one run;
and saved models compared (``--model A,B``).

Runs in the serving environment only (scripts/serve_env.sh); skipped where vLLM is not installed.
Times are not checked (they are measurements, not behaviour): the run's shape and its ratios are.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn

from compressed_experts.cli import app


def test_bench_engine_vllm_times_every_variant_and_writes_its_json(tmp_path):
    """The three fixed variants and, with --top-p, top-m and compressed experts under that rule."""
    argv = ["bench", "--engine", "vllm", "--requests", "1,2", "--new-tokens", "4", "--repeats", "1", "--top-p", "0.7"]
    result = CliRunner().invoke(app, [*argv, "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (written,) = tmp_path.glob("vllm-*.json")
    run = json.loads(written.read_text())
    variants = ("full top-k", "top-m", "compressed experts", "top_p=0.7", "top_p=0.7 + CE")
    assert [(r["variant"], r["requests"]) for r in run["rows"]] == [
        (variant, count) for variant in variants for count in (1, 2)
    ]
    main = {row["variant"]: row["main_experts_per_token"] for row in run["rows"]}
    assert main["full top-k"] == 8 and main["top-m"] == main["compressed experts"] == 4
    # measured on the sequences served: some of the 8 routed experts, the same routing for both forms
    assert 1 < main["top_p=0.7"] < 8 and main["top_p=0.7 + CE"] == pytest.approx(main["top_p=0.7"], abs=0.5)
    assert "top_p=0.7" in result.output  # the table printed
    for row in run["rows"]:
        assert row["vllm_tokens_s"] > 0 and row["transformers_tokens_s"] > 0
        full = next(r for r in run["rows"] if r["variant"] == "full top-k" and r["requests"] == row["requests"])
        assert row["vs_full_top_k"] == pytest.approx(row["vllm_tokens_s"] / full["vllm_tokens_s"])
        assert row["vllm_over_transformers"] == pytest.approx(row["vllm_tokens_s"] / row["transformers_tokens_s"])
    assert run["settings"] == {
        "source": "bundled",
        "n_ce": 4,
        "new_tokens": 4,
        "repeats": 1,
        "dtype": "float32",
        "rule": {"top_p": 0.7},
    }
    assert run["command"].startswith("compressed-experts bench")  # the command line that made it (sys.argv)


def test_bench_engine_vllm_compares_saved_models(tmp_path):
    """--model A,B: the bundled model and the same pruned to half its experts with slim stand-ins, each
    served by vLLM on the same real-text prompts; parameters and bytes from their structure, the second
    model's figures over the first's in the table."""
    import compressed_experts as ce
    from compressed_experts.checkpoint import save_model
    from compressed_experts.models_bench import models_table
    from compressed_experts.prune import prune

    model = ce.from_pretrained("bundled", dtype="float32")
    calibration = torch.randint(4, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    prune(model, calibration, keep=32, stand_in="slim", fit_steps=2)
    model.to(torch.bfloat16)  # the bundled model's dtype, as prune --stand-in saves it
    save_model(model, tmp_path / "pruned", tokenizer=ce.load_tokenizer("bundled"))
    sources = ["bundled", str(tmp_path / "pruned")]
    argv = ["bench", "--engine", "vllm", "--model", ",".join(sources), "--requests", "1,2", "--new-tokens", "4"]
    result = CliRunner().invoke(app, [*argv, "--repeats", "1", "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").glob("vllm-*-bundled-pruned.json")
    run = json.loads(written.read_text())
    assert run["engine"] == "vllm" and run["requests"] == [1, 2] and run["new_tokens"] == 4
    full, pruned = run["models"]
    assert [full["source"], pruned["source"]] == sources and full["dtype"] == pruned["dtype"]
    assert pruned["parameters"] < full["parameters"]  # 32 of 64 experts' weights gone, stand-ins added
    assert pruned["parameters"] == sum(p.numel() for p in model.parameters())
    assert full["weight_bytes"] == full["parameters"] * getattr(torch, full["dtype"]).itemsize
    assert pruned["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert all(m["output_tokens_per_s"][n] > 0 for m in run["models"] for n in ("1", "2"))
    table = models_table(run)  # what the command prints
    assert "served by vLLM one after another" in table and "active parameters" not in table  # not measured here
    ratio = pruned["output_tokens_per_s"]["2"] / full["output_tokens_per_s"]["2"]
    assert f"| vLLM output tokens/s, 2 requests | {full['output_tokens_per_s']['2']:,.0f} |" in table
    assert f"({ratio:.2f}x) |" in table and str(written) in result.output.replace("\n", "")


def test_every_vllm_benchmark_gives_the_cpu_build_a_kv_cache_size(monkeypatch, tmp_path):
    """vLLM's CPU build reserves a share of the NUMA node's memory unless given a KV-cache size, and fails to
    start when other processes hold some: a saved models' comparison (``bench --engine vllm --model A,B``)
    started it without one. The size is now set where the benchmarks build their engine."""
    import vllm

    from compressed_experts.serving.bench import vllm_rates
    from compressed_experts.serving.server import CPU_KV_CACHE_GIB

    seen = {}

    class Started(Exception):
        pass

    def fake_llm(*args, **kwargs):
        seen["space"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        raise Started

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(Started):
        vllm_rates(tmp_path, (1,), 2, 1, "float32", lambda n: [[5, 6, 7]] * n)
    assert seen["space"] == (None if torch.cuda.is_available() else str(CPU_KV_CACHE_GIB))
