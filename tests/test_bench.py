"""The benchmark machinery on a toy shape: it runs every variant, and its report says what it measured."""

from __future__ import annotations

import json

import pytest
import torch

from compressed_experts import bench

#: Fixed median times (s) per variant, scaled by the call's number, stand in for the measured ones
#: (whose machinery is checked by the interleaved_medians tests), so that every figure and row is known.
FAKE_SECONDS = {
    "transformers:eager": 4e-3,
    "transformers:grouped_mm": 3e-3,
    "full": 2e-3,
    "top-m": 1.5e-3,
    "ce": 1e-3,
    "subset": 1.25e-3,
    "slim": 0.75e-3,
    "dense": 0.5e-3,
}


def test_layer_benchmark_on_a_toy_shape(tmp_path, monkeypatch):
    real = bench.interleaved_medians
    calls = []

    def fixed_medians(fns, device, repeats=5, warmup=2):
        real(fns, device, repeats, warmup)  # every variant still runs
        calls.append({name: FAKE_SECONDS[name] * (len(calls) + 1) for name in fns})
        return calls[-1]

    monkeypatch.setattr(bench, "interleaved_medians", fixed_medians)
    result = bench.run(
        device="cpu", shapes=("tiny",), dtypes=("float32",), tokens=(1, 8), repeats=5, end_to_end=False, command="test"
    )
    rows = result["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {
        "transformers:eager",
        "transformers:grouped_mm",
        "full",
        "top-m",
        "ce",
        "subset",
        "slim",
        "dense",
    }
    assert len(rows) == 8 * 2 * 2 and len(calls) == 2 * 2  # variants x token counts x modes
    # Each row holds its own call's median of its own variant, in ms, groups in order (tokens, then mode).
    assert [(r["tokens"], r["mode"]) for r in rows[::8]] == [
        (1, "forward"),
        (1, "forward+backward"),
        (8, "forward"),
        (8, "forward+backward"),
    ]
    assert [r["ms"] for r in rows] == [calls[i // 8][r["variant"]] * 1e3 for i, r in enumerate(rows)]
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
    lines = (tmp_path / "BENCHMARKS.md").read_text().splitlines()
    assert f"### cpu: {bench.machine(torch.device('cpu'))}" in lines
    # ms of transformers (fastest), full, top-m and ce; the fastest full top-k (here the library's);
    # ratios to it of ce and top-m, full/transformers, ratios to it of subset and slim;
    # GFLOP per token (toy: below 0.0005) and MB read per token of full, ce and subset (one token: the
    # float32 weights of 4, 2 and 2 + 2 x 4/32 experts: 0.098, 0.049 and 0.055 MB).
    assert (
        "| tiny | float32 | 1 | forward | 3.00 (grouped_mm) | 2.00 | 1.50 | 1.00 | full | 0.50 | 0.75 | 0.67 | "
        "0.62 | 0.38 | 0.000, 0.000, 0.000 | 0.1, 0.0, 0.1 |"
    ) in lines
    # The second call's times are twice the first's, so the same ratios.
    assert (
        "| tiny | float32 | 1 | forward+backward | 6.00 (grouped_mm) | 4.00 | 3.00 | 2.00 | full | 0.50 | 0.75 | 0.67 | "
        "0.62 | 0.38 | 0.000, 0.000, 0.000 | 0.1, 0.0, 0.1 |"
    ) in lines


class FakeClock:
    """perf_counter for interleaved_medians: each timed function moves it on by its own next duration."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def runner(self, name, durations, calls):
        durations = iter(durations)

        def run():
            calls.append(name)
            self.now += next(durations)

        return run


def test_interleaved_medians_time_every_function_alike(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(bench, "time", clock)
    # One warm-up run each (its time is not counted), then 5 timed runs; the medians are 3 and 20 (the means 3.8 and 27).
    fns = {
        "a": clock.runner("a", [100, 9, 1, 3, 2, 4], calls),
        "b": clock.runner("b", [100, 40, 10, 20, 50, 15], calls),
    }
    medians = bench.interleaved_medians(fns, torch.device("cpu"), repeats=5, warmup=1)
    assert medians == {"a": 3, "b": 20}
    assert calls == [
        "a",
        "b",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
    ]  # the order rotates from round to round


def test_end_to_end_on_a_toy_model(monkeypatch):
    from transformers import OlmoeConfig

    real = bench.interleaved_medians
    medians = []

    def recorded(fns, device, repeats=5, warmup=2):
        medians.append(real(fns, device, repeats, warmup))
        return medians[-1]

    monkeypatch.setattr(bench, "interleaved_medians", recorded)
    config = OlmoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=4,
    )
    result = bench.bench_end_to_end(torch.device("cpu"), torch.float32, prompt=24, new_tokens=4, n_ce=2, config=config)
    assert set(result) == {"transformers", "full", "ce"}
    prefill, first, decode = medians  # a 24-token forward, a 1-token generate, a 4-token generate
    for name, figures in result.items():
        assert figures["prefill_tokens_per_s"] == pytest.approx(24 / prefill[name])
        # the 3 tokens after the first, in the time the 4-token generate took beyond the 1-token one
        assert figures["decode_tokens_per_s"] == pytest.approx(3 / max(decode[name] - first[name], 1e-9))
    report = bench.markdown(
        {
            "device": "cpu",
            "machine": "m",
            "command": "c",
            "rows": [],
            "end_to_end": {"dtype": "float32", "prompt": 24, "new_tokens": 4, **result},
        }
    ).splitlines()
    t, f, c = (result[k]["decode_tokens_per_s"] for k in ("transformers", "full", "ce"))
    assert f"| decode tokens per s | {t:.1f} | {f:.1f} | {c:.1f} | {c / max(t, f):.2f} |" in report  # the faster
    assert (
        "| | transformers' model | full top-8 (this library) | compressed experts (n_ce 4) | ce / fastest |" in report
    )


def _row_group(ms: dict[str, float], dtype: str) -> list[dict]:
    """One (OLMoE shape, 512 tokens, forward) row of stored results with these times per variant."""
    return [
        {"shape": "olmoe", "dtype": dtype, "tokens": 512, "mode": "forward", "variant": v, "ms": t}
        | {"gflop_per_token": 0.1, "expert_mb_per_token": 1.0}
        for v, t in ms.items()
    ]


def test_ratios_and_targets_are_against_the_fastest_full_top_k():
    """Where transformers' experts beat this library's full top-k, compressed experts are measured against them."""
    ms = {"transformers:eager": 5.0, "transformers:grouped_mm": 2.0, "full": 2.5, "top-m": 1.5, "ce": 1.4}
    rows = _row_group(ms, "bfloat16")
    e2e = {
        "dtype": "bfloat16",
        "prompt": 8,
        "new_tokens": 4,
        "transformers": {"prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 20.0},
        "full": {"prefill_tokens_per_s": 9.0, "decode_tokens_per_s": 16.0},
        "ce": {"prefill_tokens_per_s": 12.0, "decode_tokens_per_s": 24.0},
    }
    result = {"device": "cpu", "machine": "m", "command": "c", "rows": rows, "end_to_end": e2e}
    lines = bench.markdown(result).splitlines()
    # ce 1.4 / 2.0 (transformers' grouped_mm, the fastest) = 0.70, not 1.4 / 2.5 = 0.56.
    assert (
        "| olmoe | bfloat16 | 512 | forward | 2.00 (grouped_mm) | 2.50 | 1.50 | 1.40 | transformers (grouped_mm) | "
        "0.70 | 0.75 | 1.25 | - | - | 0.100, 0.100 | 1.0, 1.0 |" in lines
    )
    assert "| decode tokens per s | 20.0 | 16.0 | 24.0 | 1.20 |" in lines  # 24 / 20 (transformers' model), not 24 / 16
    checks = {name: (round(value, 2), ok) for name, value, _, _, ok in bench.targets(result)}
    assert checks == {
        "compressed experts / fastest full top-k (olmoe, bfloat16, 512 tokens, forward)": (0.7, False),
        "full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward)": (1.25, False),
        "decode tokens/s, compressed experts / fastest full top-k model (end to end)": (1.2, False),
    }


def test_a_partial_run_on_another_machine_is_refused_before_measuring(tmp_path):
    rows = [
        {"shape": "olmoe", "dtype": "bfloat16", "tokens": n, "mode": "forward", "variant": "full", "ms": 1.0}
        for n in (1, 512)
    ]
    (tmp_path / "cpu.json").write_text(json.dumps({"device": "cpu", "machine": "another CPU", "rows": rows}))
    cpu = torch.device("cpu")
    with pytest.raises(bench.CompressedExpertsError, match="measured on another CPU; this is .*two machines"):
        bench.check_mergeable(tmp_path, cpu, {("olmoe", "bfloat16", 1, "forward")}, end_to_end=False)
    # Every row the file holds: allowed, and the new run then replaces the old one whole.
    bench.check_mergeable(tmp_path, cpu, {("olmoe", "bfloat16", n, "forward") for n in (1, 512)}, end_to_end=False)
    new = {"machine": bench.machine(cpu), "repeats": 5, "rows": rows[:1]}
    assert bench._merge(json.loads((tmp_path / "cpu.json").read_text()), new) == new


def test_an_interrupted_run_keeps_its_rows_and_resume_measures_only_the_rest(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compressed_experts.cli import app

    timed = []

    def medians(fns, device, repeats=5, warmup=2):
        if len(timed) == 2 and not resumed:
            raise KeyboardInterrupt  # the third group: as if the user pressed Ctrl-C
        timed.append(len(fns))
        return {name: FAKE_SECONDS[name] * len(timed) for name in fns}

    monkeypatch.setattr(bench, "interleaved_medians", medians)
    out, doc = tmp_path / "benchmarks", tmp_path / "B.md"
    args = ["bench", "--device", "cpu", "--shapes", "tiny", "--dtypes", "float32", "--tokens", "1,8"]
    args += ["--no-end-to-end", "--out-dir", str(out), "--doc", str(doc)]
    resumed = False
    CliRunner().invoke(app, args)
    partial = out / "cpu.json.partial"
    saved = json.loads(partial.read_text())
    groups = [(r["tokens"], r["mode"]) for r in saved["rows"][::8]]
    assert groups == [(1, "forward"), (1, "forward+backward")] and len(saved["rows"]) == 16
    assert not (out / "cpu.json").exists() and not doc.exists()  # nothing half-done reaches the report

    resumed = True
    with pytest.raises(bench.CompressedExpertsError, match="with 5 repeats; this run is on .* with 6"):
        bench.run("cpu", ("tiny",), ("float32",), (1, 8), repeats=6, end_to_end=False, partial=partial, resume=True)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(timed) == 4  # two groups before the interruption, the two left after it
    stored = json.loads((out / "cpu.json").read_text())
    assert stored["rows"][:16] == saved["rows"]  # the interrupted run's rows, kept as measured
    assert [(r["tokens"], r["mode"]) for r in stored["rows"][16::8]] == [(8, "forward"), (8, "forward+backward")]
    assert "--resume" not in stored["command"] and not partial.exists()

    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output
    partial.write_text("{")
    with pytest.raises(bench.CompressedExpertsError, match="not a run's saved progress"):
        bench.run("cpu", ("tiny",), ("float32",), (1,), end_to_end=False, partial=partial, resume=True)


def test_the_dense_bound_computes_full_top_k_with_one_experts_weights():
    """Its products are full top-k's when every routed expert is expert 0: so its FLOPs are full top-k's."""
    variants = bench._variants(bench.SHAPES["tiny"], torch.float32, torch.device("cpu"), seed=0)
    dense, experts = variants["dense"].experts, variants["full"].experts
    x = torch.randn(5, 64)
    index = torch.zeros(5, 4, dtype=torch.long)
    weights = torch.rand(5, 4)
    torch.testing.assert_close(dense(x, index, weights), experts(x, index, weights))
    assert sum(p.numel() for p in dense.parameters()) == 3 * 64 * 32  # one expert's copy, not a view of all


def test_where_the_time_goes_table():
    ms = {"transformers:eager": 5.0, "transformers:grouped_mm": 4.0, "full": 4.0, "top-m": 2.0, "ce": 2.5, "dense": 2.0}
    rows = _row_group(ms, "float32")
    lines = bench.markdown({"device": "cpu", "machine": "m", "command": "c", "rows": rows}).splitlines()
    # ce extra (2.5 - 2.0) / 2.5 = 20%; full 0.1 GFLOP x 512 / 4 ms = 12,800 GFLOP/s, dense 25,600; 4 / 2 = 2.00
    assert "| olmoe | float32 | 512 | forward | 20% | 12800 | 25600 | 2.00 |" in lines
