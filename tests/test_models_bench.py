"""``bench --engine transformers``: whole saved models side by side (models_bench.py)."""

import json

import pytest
import torch
from conftest import FakeClock
from torch import nn
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts import bench, models_bench
from compressed_experts.architectures import family_of, moe_blocks
from compressed_experts.checkpoint import save_model
from compressed_experts.cli import app
from compressed_experts.errors import CompressedExpertsError
from compressed_experts.prune import remove_experts

TEXT = ["\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(60))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny OLMoE (64 experts, 2 MoE blocks, H 32, I 16) and the same model pruned to 16 experts, both saved."""
    root = tmp_path_factory.mktemp("models")
    model = ce.tiny_model("olmoe")
    save_model(model, root / "full", tokenizer=ce.tiny_tokenizer())
    blocks = moe_blocks(model, family_of(model))
    remove_experts(model, {name: list(range(0, 64, 4)) for name, _ in blocks})  # every fourth expert kept
    save_model(model, root / "pruned", tokenizer=ce.tiny_tokenizer())
    return root


def test_decode_rates_leave_out_the_prefill_and_count_every_sequence(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)

    def generate(prefill: float, step: float):
        def run(ids, max_new_tokens, **_):  # a prefill, then one step per token after the first
            clock.now += prefill + step * (max_new_tokens - 1)

        return run

    ids = torch.zeros(4, 8, dtype=torch.long)  # a batch of 4
    rates = bench.decode_rates(
        {"slow": generate(5.0, 0.5), "fast": generate(9.0, 0.25)}, ids, 11, torch.device("cpu"), 5, 0
    )
    # 10 steps after the first token, 4 sequences each: 40 tokens in 5 s and in 2.5 s; the prefill is left out.
    assert rates == {"slow": pytest.approx(8.0), "fast": pytest.approx(16.0)}


def test_weight_bytes_count_a_tied_tensor_once():
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert models_bench.weight_bytes(tied) == 10 * 4 * 4
    tied.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    assert models_bench.weight_bytes(tied) == 10 * 4 * 4 + 3 * 8


def test_models_side_by_side_counted_by_hand(saved):
    full, pruned = str(saved / "full"), str(saved / "pruned")
    result = models_bench.models_benchmark([full, pruned], TEXT, "cpu", batches=(1, 2), prompt=16, new_tokens=3)
    a, b = result["models"]
    assert [a["source"], b["source"]] == [full, pruned] and result["batches"] == [1, 2]
    # 2 blocks x 48 removed experts x (3 x H x I weights + a router row of H)
    removed = 2 * 48 * (3 * 32 * 16 + 32)
    assert a["parameters"] - b["parameters"] == removed
    # float32 parameters, plus the buffers (the rotary frequencies), none of them shared
    buffers = sum(t.numel() * t.element_size() for t in ce.from_pretrained(full).buffers())
    assert a["weight_bytes"] == 4 * a["parameters"] + buffers and b["weight_bytes"] == 4 * b["parameters"] + buffers
    assert a["active_parameters"] - b["active_parameters"] == 2 * 48 * 32  # only the router rows
    assert a["expert_equivalents"] == b["expert_equivalents"] == 8
    sizes = [sum(f.stat().st_size for f in (saved / d).glob("*.safetensors")) for d in ("full", "pruned")]
    assert [a["checkpoint_bytes"], b["checkpoint_bytes"]] == sizes
    for m in (a, b):
        for figure in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert set(m[figure]) == {"1", "2"} and all(v > 0 for v in m[figure].values())
    table = models_bench.models_table(result)
    assert f"| parameters | {a['parameters']:,} | {b['parameters']:,} ({b['parameters'] / a['parameters']:.2f}x) |" in (
        table
    )
    assert "decode tokens/s, batch 2" in table


def test_prefill_rate_counts_every_prompt_token_of_the_batch(saved, monkeypatch):
    calls = []

    def medians(fns, device, repeats):  # each timed function run once; every model "takes" 0.5 s
        for fn in fns.values():
            calls.append(fn())
        return {name: 0.5 for name in fns}

    monkeypatch.setattr(models_bench, "interleaved_medians", medians)
    monkeypatch.setattr(models_bench, "decode_rates", lambda generates, *a: {name: 1.0 for name in generates})
    sources = [str(saved / "full"), str(saved / "pruned")]
    result = models_bench.models_benchmark(sources, TEXT, "cpu", batches=(1, 3), prompt=16, new_tokens=2)
    # 3 prompts of 16 tokens in 0.5 s: 96 tokens/s; and generate's prefill: the last position's logits only
    assert [m["prefill_tokens_per_s"] for m in result["models"]] == [{"1": 32.0, "3": 96.0}] * 2
    assert {tuple(out.logits.shape) for out in calls} == {(1, 1, 128), (3, 1, 128)}


def test_models_load_in_the_references_dtype_and_rules_are_measured_on_the_prompts(saved, tmp_path):
    ruled = tmp_path / "ruled"
    bf16 = ce.from_pretrained(saved / "full", top_p=0.5, dtype=torch.bfloat16)
    save_model(bf16, ruled, tokenizer=ce.tiny_tokenizer())
    result = models_bench.models_benchmark([str(saved / "full"), str(ruled)], TEXT, "cpu", (1,), 16, 2)
    # saved in bfloat16, timed in the reference's float32
    assert [m["dtype"] for m in result["models"]] == ["float32", "float32"]
    measured = result["models"][1]["expert_equivalents"]
    assert 1 <= measured < 8  # top_p 0.5 runs fewer than all 8 routed experts, at least one


@pytest.mark.parametrize(
    ("sources", "settings", "words"),
    [
        (["full"], {}, "at least two models"),
        (["full", "full"], {}, "named twice"),
        (["full", "pruned"], {"new_tokens": 1}, "at least 2"),
        (["full", "pruned"], {"batches": (400,)}, "the largest batch needs 400"),
    ],
)
def test_bad_input_refused_before_any_model_loads(saved, monkeypatch, sources, settings, words):
    monkeypatch.setattr(models_bench, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(CompressedExpertsError, match=words):
        models_bench.models_benchmark([str(saved / s) for s in sources], TEXT, "cpu", prompt=16, **settings)


def test_layer_report_leaves_engine_results_alone(tmp_path):
    (tmp_path / "models-cpu-x.json").write_text(json.dumps({"models": []}))
    (tmp_path / "vllm-cpu-x.json").write_text(json.dumps({"rows": "not timings"}))
    assert bench.stored_results(tmp_path) == {}


def test_engine_results_are_named_for_the_device_and_the_models_compared():
    assert bench.engine_results_name("vllm", "cpu: Intel(R) Xeon(R)") == "vllm-cpu-intel-r-xeon-r.json"
    name = bench.engine_results_name("transformers", "cuda-h200", ["bundled", "out/keep 32+slim/", "/abs/Pruned"])
    assert name == "models-cuda-h200-bundled-keep-32-slim-pruned.json"
    assert name != bench.engine_results_name("transformers", "cuda-h200", ["bundled", "out/keep32"])
    assert all(
        bench.engine_results_name(e, "d").startswith(tuple(bench.ENGINE_RESULTS.values()))
        for e in ("vllm", "transformers")
    )


def test_command_compares_and_writes_its_result(saved, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXT * 4))
    models = f"{saved / 'full'},{saved / 'pruned'}"
    args = ["bench", "--engine", "transformers", "--device", "cpu", "--model", models, "--requests", "1"]
    args += ["--new-tokens", "2", "--prompt-tokens", "16", "--text", str(text), "--out-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "out").glob("models-*.json")
    assert written.name.endswith(
        "-full-pruned.json"
    )  # named for the models compared: no other comparison overwrites it
    stored = json.loads(written.read_text())
    assert [m["source"] for m in stored["models"]] == models.split(",") and stored["text"] == str(text)
    assert stored["prompt"] == 16 and stored["batches"] == [1] and stored["new_tokens"] == 2
    assert "weights in memory" in result.output

    for extra, words in (
        (["--model", str(saved / "full")], "at least two models"),
        (["--model", models, "--top-p", "0.5"], "save the model under the rule"),
        (["--model", models, "--engine", "vllm", "--top-p", "0.5"], "save the model under the rule"),
        (["--model", models, "--repeats", "3"], "at least 5"),
        (["--model", models, "--prompt-tokens", "0", "--text", str(text)], "at least 1 token"),
        (["--model", models, "--report-only"], "leave out --engine"),
    ):
        result = CliRunner().invoke(app, ["bench", "--engine", "transformers", "--device", "cpu", *extra])
        assert result.exit_code == 2 and words in result.output, result.output
    for extra in (["--text", str(text)], ["--engine", "vllm", "--prompt-tokens", "32"]):
        result = CliRunner().invoke(app, ["bench", *extra])
        assert result.exit_code == 2 and "are for comparing saved models" in result.output, result.output
