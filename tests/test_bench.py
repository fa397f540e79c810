"""The benchmark machinery on a toy shape: it runs every variant, and its report says what it measured."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import FakeClock, randomise_compressed_experts, tokens

from compressed_experts import bench
from compressed_experts.backends import fused

#: Fixed median times (s) per variant, scaled by the call's number, stand in for the measured ones
#: (whose machinery is checked by the interleaved_medians tests), so that every figure and row is known.
#: This machine's CPU results file name (``cpu-<model>``): each CPU model keeps its own section.
CPU_KEY = bench.device_key(torch.device("cpu"))

FAKE_SECONDS = {
    "transformers:eager": 4e-3,
    "transformers:grouped_mm": 3e-3,
    "full": 2e-3,
    "top-m": 1.5e-3,
    "ce": 1e-3,
    "subset": 1.25e-3,
    "slim": 0.75e-3,
    "dense": 0.5e-3,
    "full:fused": 2.5e-3,
    "top-m:fused": 1.2e-3,
    "ce:fused": 0.8e-3,
    "ce:top-p": 1.1e-3,
    "ce:top-p:fused": 0.9e-3,
}
#: Where the fused kernels run on this CPU: under Triton's interpreter (conftest sets it without a GPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and fused.available()
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="the fused kernels need TRITON_INTERPRET=1 on a CPU")


def test_layer_benchmark_on_a_toy_shape(tmp_path, monkeypatch):
    real = bench.interleaved_times
    calls = []

    def fixed_times(fns, device, repeats=5, warmup=2):
        real(fns, device, repeats=1, warmup=0)  # every variant still runs (once: the interpreted kernels are slow)
        calls.append({name: FAKE_SECONDS[name] * (len(calls) + 1) for name in fns})
        return {name: [seconds] for name, seconds in calls[-1].items()}

    monkeypatch.setattr(bench, "interleaved_times", fixed_times)
    result = bench.run(
        device="cpu", shapes=("tiny",), dtypes=("float32",), tokens=(1, 8), repeats=5, end_to_end=False, command="test"
    )
    rows = result["rows"]
    variants = {r["variant"] for r in rows}
    fused_variants = {"full:fused", "top-m:fused", "ce:fused", "ce:top-p:fused"} if INTERPRETED else set()
    assert variants == {
        "transformers:eager",
        "transformers:grouped_mm",
        "full",
        "top-m",
        "ce",
        "ce:top-p",
        "subset",
        "slim",
        "dense",
        *fused_variants,
    }
    n = len(variants)
    assert len(rows) == n * 2 * 2 and len(calls) == 2 * 2  # variants x token counts x modes
    # Each row holds its own call's median of its own variant, in ms, groups in order (tokens, then mode).
    assert [(r["tokens"], r["mode"]) for r in rows[::n]] == [
        (1, "forward"),
        (1, "forward+backward"),
        (8, "forward"),
        (8, "forward+backward"),
    ]
    assert [r["ms"] for r in rows] == [calls[i // n][r["variant"]] * 1e3 for i, r in enumerate(rows)]
    if INTERPRETED:  # the same products on another path: the same analytic costs
        by_variant = {r["variant"]: r for r in rows[:n]}
        for name in ("full", "top-m", "ce", "ce:top-p"):
            fields = ("gflop_per_token", "expert_mb_per_token")
            assert [by_variant[f"{name}:fused"][f] for f in fields] == [by_variant[name][f] for f in fields]
    full = next(r for r in rows if r["variant"] == "full" and r["tokens"] == 1 and r["mode"] == "forward")
    ce = next(r for r in rows if r["variant"] == "ce" and r["tokens"] == 1 and r["mode"] == "forward")
    assert full["gflop_per_token"] == 2 * 3 * 64 * 32 * 4 / 1e9  # k = 4 experts of 3 H x I matrices
    assert ce["gflop_per_token"] == full["gflop_per_token"] / 2  # n_ce = 2 of 4
    assert ce["expert_mb_per_token"] == 2 * 3 * 64 * 32 * 4 / 1e6  # one token: 2 experts' float32 weights
    # Under the per-token rule: the main experts top_p keeps on this routing (1 to 4 of them, a whole
    # number at one token), each read once.
    ruled = next(r for r in rows if r["variant"] == "ce:top-p" and r["tokens"] == 1 and r["mode"] == "forward")
    kept = ruled["gflop_per_token"] / (2 * 3 * 64 * 32 / 1e9)
    assert kept == pytest.approx(round(kept)) and 1 <= round(kept) <= 4
    assert ruled["expert_mb_per_token"] == pytest.approx(round(kept) * 3 * 64 * 32 * 4 / 1e6)
    subset = next(r for r in rows if r["variant"] == "subset" and r["tokens"] == 1 and r["mode"] == "forward")
    # 2 full experts and 2 auxiliary ones at r = I / 8 = 4 of their 32 neurons
    assert subset["gflop_per_token"] == pytest.approx(2 * 3 * 64 * 32 * (2 + 2 * 4 / 32) / 1e9)
    assert subset["expert_mb_per_token"] == pytest.approx(3 * 64 * 32 * 4 * (2 + 2 * 4 / 32) / 1e6)
    bench.write_report(result, tmp_path / "benchmarks", tmp_path / "BENCHMARKS.md")
    stored = json.loads((tmp_path / "benchmarks" / f"{CPU_KEY}.json").read_text())
    assert stored["rows"] == rows and stored["machine"] == bench.machine(torch.device("cpu"))
    lines = (tmp_path / "BENCHMARKS.md").read_text().splitlines()
    assert f"### {CPU_KEY}: {bench.machine(torch.device('cpu'))}" in lines
    # ms of transformers (fastest), full, top-m and ce; the fastest full top-k (here the library's);
    # ratios to it of ce and top-m, full/transformers, ratios to it of subset and slim;
    # GFLOP per token (toy: below 0.0005) and MB read per token of full, ce and subset (one token: the
    # float32 weights of 4, 2 and 2 + 2 x 4/32 experts: 0.098, 0.049 and 0.055 MB).
    # ce under the rule: 1.1 / 2.0 of the fastest, its MB as measured above.
    mb = f"{ruled['expert_mb_per_token']:.1f}"
    assert (
        "| tiny | float32 | 1 | forward | 3.00 (grouped_mm) | 2.00 | 1.50 | 1.00 | full | 0.50 | 0.75 | 0.67 | "
        f"0.62 | 0.38 | 0.55 | 0.000, 0.000, 0.000, 0.000 | 0.1, 0.0, 0.1, {mb} |"
    ) in lines
    # The second call's times are twice the first's, so the same ratios.
    assert (
        "| tiny | float32 | 1 | forward+backward | 6.00 (grouped_mm) | 4.00 | 3.00 | 2.00 | full | 0.50 | 0.75 | 0.67 | "
        f"0.62 | 0.38 | 0.55 | 0.000, 0.000, 0.000, 0.000 | 0.1, 0.0, 0.1, {mb} |"
    ) in lines
    if INTERPRETED:
        # ms of full, top-m, ce and ce under the rule through the fused kernels; each over itself on the auto
        # path; the best ce (ce:fused, 0.8) over the fastest full top-k (full on the auto path, 2.0: full:fused is 2.5).
        assert (
            "| tiny | float32 | 1 | forward | 2.50 | 1.20 | 0.80 | 0.90 | 1.25 | 0.80 | 0.80 | 0.82 | 0.40 |" in lines
        )


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
    # The spread: interquartile range over the median (a: 2..4 of 1, 2, 3, 4, 9; b: 15..40), the range below 4.
    assert bench.spread([9, 1, 3, 2, 4]) == pytest.approx(2 / 3) and bench.spread([40, 10, 20, 50, 15]) == 1.25
    assert bench.spread([1.0, 3.0]) == 1.0 and bench.spread([2.0]) == 0.0
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


def toy_config():
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=4,
    )


def static_cache_uncompiled(model, max_cache_len):
    """compiled_generate's stand-in: a static cache, no compiling (that is the next test's, once)."""
    return lambda ids, **kwargs: model.generate(ids, cache_implementation="static", **kwargs)


def test_end_to_end_on_a_toy_model(monkeypatch):
    real = bench.interleaved_medians
    medians = []

    def recorded(fns, device, repeats=5, warmup=2):
        medians.append(real(fns, device, repeats, warmup))
        return medians[-1]

    monkeypatch.setattr(bench, "interleaved_medians", recorded)
    monkeypatch.setattr(bench, "compiled_generate", static_cache_uncompiled)
    result = bench.bench_end_to_end(
        torch.device("cpu"), torch.float32, 24, 4, repeats=1, n_ce=2, config=toy_config(), compiled=True
    )
    assert set(result) == {"transformers", "full", "ce", "compiled_decode"}
    assert result.pop("compiled_decode") == {"mode": "reduce-overhead"}
    # a 24-token forward, a 1-token generate, a 4-token generate; then the last two in the compiled mode
    prefill, first, decode, first_compiled, decode_compiled = medians
    for name, figures in result.items():
        assert figures["prefill_tokens_per_s"] == pytest.approx(24 / prefill[name])
        # the 3 tokens after the first, in the time the 4-token generate took beyond the 1-token one
        assert figures["decode_tokens_per_s"] == pytest.approx(3 / max(decode[name] - first[name], 1e-9))
        rate = 3 / max(decode_compiled[name] - first_compiled[name], 1e-9)
        assert figures["decode_tokens_per_s_compiled"] == pytest.approx(rate)
        assert figures["compiled_same_tokens"] is True
    e2e = {"dtype": "float32", "prompt": 24, "new_tokens": 4, "compiled_decode": {"mode": "reduce-overhead"}, **result}
    report = bench.markdown({"device": "cpu", "machine": "m", "command": "c", "rows": [], "end_to_end": e2e})
    report = report.splitlines()
    t, f, c = (result[k]["decode_tokens_per_s"] for k in ("transformers", "full", "ce"))
    assert f"| decode tokens per s | {t:.1f} | {f:.1f} | {c:.1f} | {c / max(t, f):.2f} |" in report  # the faster
    assert (
        "| | transformers' model | full top-8 (this library) | compressed experts (n_ce 4) | ce / fastest |" in report
    )
    t, f, c = (result[k]["decode_tokens_per_s_compiled"] for k in ("transformers", "full", "ce"))
    line = f"| decode tokens per s, compiled (reduce-overhead, static cache) | {t:.1f} | {f:.1f} | {c:.1f} | {c / max(t, f):.2f} |"
    assert line in report
    assert "| compiled greedy tokens = eager ones | yes | yes | yes | |" in report


def test_a_failed_compile_keeps_the_eager_figures_and_says_why(monkeypatch):
    def broken(model, max_cache_len):
        def generate(ids, **kwargs):
            raise RuntimeError("inductor could not\ncompile this")

        return generate

    monkeypatch.setattr(bench, "compiled_generate", broken)
    with pytest.warns(UserWarning, match="compiled decode failed: RuntimeError: inductor could not$"):
        result = bench.bench_end_to_end(
            torch.device("cpu"), torch.float32, 8, 2, repeats=1, n_ce=2, config=toy_config(), compiled=True
        )
    assert result["compiled_decode"] == {"mode": "reduce-overhead", "error": "RuntimeError: inductor could not"}
    assert all(
        set(result[k]) == {"prefill_tokens_per_s", "decode_tokens_per_s"} for k in ("transformers", "full", "ce")
    )
    e2e = {"dtype": "float32", "prompt": 8, "new_tokens": 2, **result}
    lines = bench.markdown({"device": "cuda-h200", "machine": "m", "command": "c", "rows": [], "end_to_end": e2e})
    lines = lines.splitlines()
    assert (
        "Compiled decode (torch.compile mode reduce-overhead, static cache) failed: RuntimeError: inductor could not"
        in lines
    )
    # The GPU's end-to-end target is in each model's fastest mode: not measured without the compiled one.
    target = "decode tokens/s, compressed experts / fastest full top-k model, each in its fastest mode (end to end)"
    assert f"| {target} | not measured | min 1.3 | no |  |  |" in lines


@pytest.mark.compiles
def test_compiled_generate_with_a_static_cache_gives_the_eager_tokens():
    """The route bench times as decode's fastest mode: transformers' static cache and torch.compile
    (mode reduce-overhead; on the CPU without CUDA graphs), this library's blocks compiled whole
    through their custom operator: no graph break, the eager greedy tokens, call after call on the
    one cache it keeps."""
    import compressed_experts as ce

    model = ce.from_pretrained("tiny:olmoe", n_ce=2).eval()
    randomise_compressed_experts(model)
    ids = tokens(batch=1, length=7)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with torch.no_grad():
            expected = model.generate(ids, **greedy)
            generate = bench.compiled_generate(model, ids.shape[1] + 6)
            first, again = generate(ids, **greedy), generate(ids, **greedy)
        counters = torch._dynamo.utils.counters
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert torch.equal(first, expected) and torch.equal(again, expected)


def test_compiled_decode_needs_the_end_to_end_run(tmp_path):
    from typer.testing import CliRunner

    from compressed_experts.cli import app

    args = ["bench", "--device", "cpu", "--shapes", "tiny", "--no-end-to-end", "--compiled-decode"]
    result = CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path), "--doc", str(tmp_path / "B.md")])
    assert result.exit_code == 2 and "--compiled-decode times the end-to-end run" in result.output


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
        "0.70 | 0.75 | 1.25 | - | - | - | 0.100, 0.100 | 1.0, 1.0 |" in lines
    )
    assert "| decode tokens per s | 20.0 | 16.0 | 24.0 | 1.20 |" in lines  # 24 / 20 (transformers' model), not 24 / 16
    checks = {name: (round(value, 2), ok) for name, value, _, _, ok, _ in bench.targets(result)}
    assert checks == {
        "compressed experts / fastest full top-k (olmoe, bfloat16, 512 tokens, forward)": (0.7, False),
        "full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward)": (1.25, False),
        "decode tokens/s, compressed experts / fastest full top-k model (end to end)": (1.2, False),
    }


def test_a_miss_within_the_repeat_spread_says_so():
    rows = _row_group(
        {"transformers:eager": 2.0, "transformers:grouped_mm": 2.2, "full": 2.1, "top-m": 1.0, "ce": 1.1}, "bfloat16"
    )
    spreads = {"transformers:eager": 0.03, "full": 0.08, "ce": 0.01}
    result = {
        "device": "cpu",
        "machine": "m",
        "command": "c",
        "rows": [r | {"spread": spreads.get(r["variant"], 0.5)} for r in rows],
    }
    checks = {name: (round(value, 3), ok, noise) for name, value, _, _, ok, noise in bench.targets(result)}
    assert checks["full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward)"] == (1.05, False, 0.08)
    # ce against the fastest full top-k (transformers' eager): the larger spread of the two.
    assert checks["compressed experts / fastest full top-k (olmoe, bfloat16, 512 tokens, forward)"] == (
        0.55,
        True,
        0.03,
    )
    lines = bench.markdown(result).splitlines()
    assert (
        "| full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward) | 1.050 | max 1.0 | no | +5.0% (within the spread) | 8.0% |"
        in lines
    )
    # Results from before spreads were kept: no spread, and no verdict on the noise.
    old = {**result, "rows": rows}
    assert (
        "| full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward) | 1.050 | max 1.0 | no | +5.0% |  |"
        in bench.markdown(old).splitlines()
    )


def test_cpu_results_are_kept_per_cpu_model(tmp_path):
    assert CPU_KEY.startswith("cpu-") and CPU_KEY != "cpu-"
    assert bench.device_key(torch.device("cpu")) == CPU_KEY  # the same machine, the same file
    # A result of another CPU model is a report section of its own, with the CPU targets.
    times = {"full": 2.0, "top-m": 1.0, "ce": 1.0, "transformers:eager": 3.0, "transformers:grouped_mm": 3.0}
    cost = {"gflop_per_token": 0.1, "expert_mb_per_token": 1.0}
    rows = [
        {"shape": "olmoe", "dtype": "bfloat16", "tokens": 1, "mode": "forward", "variant": v, "ms": ms, **cost}
        for v, ms in times.items()
    ]
    other = {"device": "cpu-some-other-model", "machine": "Some Other Model", "command": "c", "rows": rows}
    assert bench.targets(other)[0][:2] == (
        "compressed experts / fastest full top-k (olmoe, bfloat16, 1 tokens, forward)",
        0.5,
    )
    assert "### cpu-some-other-model: Some Other Model" in bench.markdown(other).splitlines()


def test_a_partial_run_on_another_machine_is_refused_before_measuring(tmp_path):
    rows = [
        {"shape": "olmoe", "dtype": "bfloat16", "tokens": n, "mode": "forward", "variant": "full", "ms": 1.0}
        for n in (1, 512)
    ]
    # The same CPU model with other settings (threads, torch): the same file, another machine line.
    stored = {"device": CPU_KEY, "machine": "another CPU", "rows": rows}
    (tmp_path / f"{CPU_KEY}.json").write_text(json.dumps(stored))
    cpu = torch.device("cpu")
    with pytest.raises(bench.CompressedExpertsError, match="measured on another CPU; this is .*two machines"):
        bench.check_mergeable(tmp_path, cpu, {("olmoe", "bfloat16", 1, "forward")}, end_to_end=False)
    # Every row the file holds: allowed, and the new run then replaces the old one whole.
    bench.check_mergeable(tmp_path, cpu, {("olmoe", "bfloat16", n, "forward") for n in (1, 512)}, end_to_end=False)
    new = {"machine": bench.machine(cpu), "repeats": 5, "rows": rows[:1]}
    assert bench._merge(json.loads((tmp_path / f"{CPU_KEY}.json").read_text()), new) == new


def test_an_interrupted_run_keeps_its_rows_and_resume_measures_only_the_rest(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compressed_experts.cli import app

    timed = []

    def times(fns, device, repeats=5, warmup=2):
        if len(timed) == 2 and not resumed:
            raise KeyboardInterrupt  # the third group: as if the user pressed Ctrl-C
        timed.append(len(fns))
        return {name: [FAKE_SECONDS[name] * len(timed)] for name in fns}

    monkeypatch.setattr(bench, "interleaved_times", times)
    out, doc = tmp_path / "benchmarks", tmp_path / "B.md"
    args = ["bench", "--device", "cpu", "--shapes", "tiny", "--dtypes", "float32", "--tokens", "1,8"]
    args += ["--no-end-to-end", "--out-dir", str(out), "--doc", str(doc)]
    resumed = False
    n = 13 if INTERPRETED else 9  # variants a group times (the fused ones where the kernels run)
    CliRunner().invoke(app, args)
    partial = out / f"{CPU_KEY}.json.partial"
    saved = json.loads(partial.read_text())
    groups = [(r["tokens"], r["mode"]) for r in saved["rows"][::n]]
    assert groups == [(1, "forward"), (1, "forward+backward")] and len(saved["rows"]) == 2 * n
    assert not (out / f"{CPU_KEY}.json").exists() and not doc.exists()  # nothing half-done reaches the report

    resumed = True
    with pytest.raises(bench.CompressedExpertsError, match="with 5 repeats; this run is on .* with 6"):
        bench.run("cpu", ("tiny",), ("float32",), (1, 8), repeats=6, end_to_end=False, partial=partial, resume=True)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(timed) == 4  # two groups before the interruption, the two left after it
    stored = json.loads((out / f"{CPU_KEY}.json").read_text())
    assert stored["rows"][: 2 * n] == saved["rows"]  # the interrupted run's rows, kept as measured
    assert [(r["tokens"], r["mode"]) for r in stored["rows"][2 * n :: n]] == [(8, "forward"), (8, "forward+backward")]
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


@needs_interpreter
def test_fused_variants_are_the_same_blocks_on_the_fused_path():
    """Shallow copies: the same router, expert weights and vectors (a change to one is a change to the
    other), only the path differs; and they compute what their auto-path twins compute."""
    variants = bench._variants(bench.SHAPES["tiny"], torch.float32, torch.device("cpu"), seed=0)
    x = torch.randn(1, 3, 64)
    for name in bench.FUSED:
        auto, fused_ = variants[name], variants[f"{name}:fused"]
        assert (auto.experts.path, fused_.experts.path) == ("auto", "fused")
        assert fused_.gate is auto.gate and fused_.experts.gate_up_proj is auto.experts.gate_up_proj
        assert dict(fused_.experts.named_parameters()).keys() == dict(auto.experts.named_parameters()).keys()
        assert all(p is q for p, q in zip(fused_.experts.parameters(), auto.experts.parameters()))
        with torch.no_grad():
            torch.testing.assert_close(fused_(x), auto(x), rtol=1e-5, atol=1e-6)
    assert variants["ce:fused"].experts.ce_gate is variants["ce"].experts.ce_gate


@needs_interpreter
def test_compare_paths_times_every_path_that_runs_and_reports_each_row_at_once():
    lines = []
    rows = bench.compare_paths(("tiny",), (torch.float32,), (2,), ("forward",), torch.device("cpu"), 1, lines.append)
    # On a CPU the decode kernels (CUDA only) refuse the call: no row, "-" in the table.
    assert {r["variant"] for r in rows} == {"full:grouped", "full:fused", "ce:grouped", "ce:fused"}
    assert lines[2].startswith("| shape | dtype | tokens | pass | full grouped ms | full decode ms | full fused ms |")
    assert len(lines) == 5  # the title, a blank line, the header, its rule, one row
    cells = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert cells[:4] == ["tiny", "float32", "2", "forward"] and cells[5] == "-" and cells[8] == "-"
    ms = {r["variant"]: r["ms"] for r in rows}
    assert [float(cells[i]) for i in (4, 6, 7, 9)] == pytest.approx(
        [ms[n] for n in ("full:grouped", "full:fused", "ce:grouped", "ce:fused")], abs=1e-3
    )
    assert float(cells[12]) < 1e-5  # fused and grouped agree (float32)


def _gpu_rows(shape: str, dtype: str, groups: dict[tuple[int, str], dict[str, float]]) -> list[dict]:
    return [
        {"shape": shape, "dtype": dtype, "tokens": n, "mode": mode, "variant": v, "ms": t}
        | {"gflop_per_token": 0.1, "expert_mb_per_token": 1.0}
        for (n, mode), ms in groups.items()
        for v, t in ms.items()
    ]


def test_gpu_targets_take_each_variant_at_its_best_and_list_what_was_not_measured():
    theirs = {"transformers:eager": 9.0, "transformers:grouped_mm": 4.0}
    rows = _gpu_rows(
        "olmoe",
        "bfloat16",
        {
            # fused full top-k is the fastest full top-k (2.0); ce's best is ce:fused 1.1: 0.55
            (1, "forward"): theirs | {"full": 3.0, "full:fused": 2.0, "top-m": 2.0, "ce": 2.5, "ce:fused": 1.1},
            # no fused rows here (an older result): ce / full 0.7 over 0.65
            (16, "forward"): theirs | {"full": 2.0, "top-m": 1.2, "ce": 1.4},
            # transformers' grouped_mm is the fastest full top-k; ce on the auto path is its best: 2.4 / 3.0
            (512, "forward+backward"): {"transformers:eager": 9.0, "transformers:grouped_mm": 3.0}
            | {"full": 3.5, "full:fused": 3.2, "top-m": 2.0, "ce": 2.4, "ce:fused": 2.6, "dense": 1.0},
        },
    )
    rows += _gpu_rows("phimoe", "float32", {(1, "forward"): theirs | {"full": 2.0, "top-m": 1.0, "ce": 1.2}})
    rows += _gpu_rows("tiny", "float32", {(1, "forward"): theirs | {"full": 2.0, "top-m": 1.0, "ce": 1.2}})
    e2e = {"dtype": "bfloat16", "prompt": 8, "new_tokens": 4, "compiled_decode": {"mode": "reduce-overhead"}}
    e2e |= {
        "transformers": {
            "prefill_tokens_per_s": 1.0,
            "decode_tokens_per_s": 100.0,
            "decode_tokens_per_s_compiled": 300.0,
        },
        "full": {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 250.0, "decode_tokens_per_s_compiled": 200.0},
        "ce": {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 260.0, "decode_tokens_per_s_compiled": 420.0},
    }
    for k in ("transformers", "full", "ce"):
        e2e[k]["compiled_same_tokens"] = k != "full"
    result = {"device": "cuda-nvidia-h200", "machine": "m", "command": "c", "rows": rows, "end_to_end": e2e}
    checks = {
        name: (value if value is None else round(value, 3), ok) for name, value, _, _, ok, _ in bench.targets(result)
    }
    best = "compressed experts at their best (auto or fused path) / fastest full top-k"
    expected = {
        f"{best} (olmoe, bfloat16, 1 tokens, forward)": (0.55, True),
        f"{best} (olmoe, bfloat16, 16 tokens, forward)": (0.7, False),
        f"{best} (olmoe, bfloat16, 512 tokens, forward)": (None, False),
        f"{best} (olmoe, bfloat16, 4096 tokens, forward)": (None, False),
        f"{best} (olmoe, bfloat16, 512 tokens, forward+backward)": (0.8, True),
        f"{best} (olmoe, bfloat16, 4096 tokens, forward+backward)": (None, False),
        f"{best} (phimoe, float32, 1 tokens, forward)": (0.6, True),
        f"{best} (phimoe, float32, 16 tokens, forward)": (None, False),
        f"{best} (phimoe, float32, 512 tokens, forward)": (None, False),
        f"{best} (phimoe, float32, 4096 tokens, forward)": (None, False),
        f"{best} (phimoe, float32, 512 tokens, forward+backward)": (None, False),
        f"{best} (phimoe, float32, 4096 tokens, forward+backward)": (None, False),
        # this library's fastest full top-k (fused where faster) over transformers' fastest, every row
        "full top-k / transformers' fastest (olmoe, bfloat16, 1 tokens, forward)": (0.5, True),
        "full top-k / transformers' fastest (olmoe, bfloat16, 16 tokens, forward)": (0.5, True),
        "full top-k / transformers' fastest (olmoe, bfloat16, 512 tokens, forward+backward)": (1.067, False),
        "full top-k / transformers' fastest (phimoe, float32, 1 tokens, forward)": (0.5, True),
        "full top-k / transformers' fastest (tiny, float32, 1 tokens, forward)": (0.5, True),
        # ce compiled 420 over the fastest full top-k model in its fastest mode, transformers' compiled 300
        "decode tokens/s, compressed experts / fastest full top-k model, each in its fastest mode (end to end)": (
            1.4,
            True,
        ),
    }
    assert checks == expected
    lines = bench.markdown(result).splitlines()
    assert f"| {best} (olmoe, bfloat16, 4096 tokens, forward) | not measured | max 0.65 | no |  |  |" in lines
    assert f"| {best} (olmoe, bfloat16, 16 tokens, forward) | 0.700 | max 0.65 | no | +7.7% |  |" in lines
    # The main table: the fastest full top-k is full:fused; ce there is the auto path's (2.5 / 2.0).
    assert (
        "| olmoe | bfloat16 | 1 | forward | 4.00 (grouped_mm) | 3.00 | 2.00 | 2.50 | full:fused | 1.25 | 1.00 | "
        "0.50 | - | - | - | 0.100, 0.100 | 1.0, 1.0 |"
    ) in lines
    # The fused table: rows with fused variants only; fused/auto of full, top-m and ce under the rule (not
    # timed) and ce; best ce.
    assert "| olmoe | bfloat16 | 1 | forward | 2.00 | - | 1.10 | - | 0.67 | - | 0.44 | - | 0.55 |" in lines
    assert not any(line.startswith("| olmoe | bfloat16 | 16 | forward | 2.00 | - |") for line in lines)
    # Where the time goes, with the fused columns: ce:fused has no top-m:fused to compare with.
    # (2.4 - 2.0) / 2.4 = 17%; 0.1 GFLOP x 512 tokens in 3.5, 1.0 and 3.2 ms: 14629, 51200 and 16000 GFLOP/s
    assert "| olmoe | bfloat16 | 512 | forward+backward | 17% | 14629 | 51200 | 3.50 | - | 16000 |" in lines
    # End to end: compiled and fastest-mode rows against the faster full top-k model of each row.
    assert "| decode tokens per s, compiled (reduce-overhead, static cache) | 300.0 | 200.0 | 420.0 | 1.40 |" in lines
    assert "| decode tokens per s, fastest mode | 300.0 | 250.0 | 420.0 | 1.40 |" in lines
    assert "| compiled greedy tokens = eager ones | yes | no | yes | |" in lines


def test_the_cpu_keeps_its_own_targets():
    """A CPU result is held to the CPU targets (TARGETS, eager decode), not to the GPU's."""
    rows = _gpu_rows("olmoe", "bfloat16", {(16, "forward"): {"transformers:eager": 2.0, "full": 2.0, "ce": 1.0}})
    names = [name for name, *_ in bench.targets({"device": "cpu", "machine": "m", "command": "c", "rows": rows})]
    assert names == ["full top-k / transformers' fastest (olmoe, bfloat16, 16 tokens, forward)"]
