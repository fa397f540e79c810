"""The benchmark machinery on a toy shape: it runs every variant, and its report says what it measured."""

from __future__ import annotations

import json

import pytest
import torch

from compressed_experts import bench


def test_layer_benchmark_on_a_toy_shape(tmp_path):
    result = bench.run(device="cpu", shapes=("tiny",), dtypes=("float32",), tokens=(1, 8), repeats=5,
                       end_to_end=False, command="test")
    rows = result["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {"transformers:eager", "transformers:grouped_mm", "full", "top-m", "ce", "subset", "slim"}
    assert len(rows) == 7 * 2 * 2  # variants x token counts x modes
    assert all(r["ms"] > 0 for r in rows)
    full = next(r for r in rows if r["variant"] == "full" and r["tokens"] == 1 and r["mode"] == "forward")
    ce = next(r for r in rows if r["variant"] == "ce" and r["tokens"] == 1 and r["mode"] == "forward")
    assert full["gflop_per_token"] == 2 * 3 * 64 * 32 * 4 / 1e9  # k = 4 experts of 3 H x I matrices
    assert ce["gflop_per_token"] == full["gflop_per_token"] / 2  # n_ce = 2 of 4
    assert ce["expert_mb_per_token"] == 2 * 3 * 64 * 32 * 4 / 1e6  # one token: 2 experts' float32 weights
    subset = next(r for r in rows if r["variant"] == "subset" and r["tokens"] == 1 and r["mode"] == "forward")
    # 2 full experts and 2 auxiliary ones at r = I / 8 = 4 of their 32 neurons
    assert subset["gflop_per_token"] == pytest.approx(2 * 3 * 64 * 32 * (2 + 2 * 4 / 32) / 1e9)
    assert subset["expert_mb_per_token"] == pytest.approx(3 * 64 * 32 * 4 * (2 + 2 * 4 / 32) / 1e6)
    bench.write_report(result, tmp_path / "benchmarks", tmp_path / "BENCHMARKS.md")
    stored = json.loads((tmp_path / "benchmarks" / "cpu.json").read_text())
    assert stored["rows"] == rows and stored["machine"] == bench.machine(torch.device("cpu"))
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| tiny | float32 | 8 | forward |" in text and bench.machine(torch.device("cpu")) in text


def test_interleaved_medians_time_every_function_alike():
    calls = []
    medians = bench.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                        torch.device("cpu"), repeats=5, warmup=1)
    assert set(medians) == {"a", "b"} and calls.count("a") == calls.count("b") == 6
    assert calls[2:6] == ["a", "b", "b", "a"]  # the order rotates from round to round


def test_end_to_end_on_a_toy_model():
    from transformers import OlmoeConfig

    config = OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4)
    result = bench.bench_end_to_end(torch.device("cpu"), torch.float32, prompt=24, new_tokens=4, n_ce=2, config=config)
    assert set(result) == {"transformers", "full", "ce"}
    for figures in result.values():
        assert figures["prefill_tokens_per_s"] > 0 and figures["decode_tokens_per_s"] > 0
    report = bench.markdown({"device": "cpu", "machine": "m", "command": "c", "rows": [],
                             "end_to_end": {"dtype": "float32", "prompt": 24, "new_tokens": 4, **result}})
    ratio = result["ce"]["decode_tokens_per_s"] / result["full"]["decode_tokens_per_s"]
    assert f"| {ratio:.2f} |" in report and "full top-8 (this library)" in report
