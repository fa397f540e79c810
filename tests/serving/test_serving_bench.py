"""``bench --engine vllm``: the three variants of a model served by vLLM, timed side by side in one run.

Runs in the serving environment only (scripts/serve_env.sh); skipped where vLLM is not installed.
Times are not checked (they are measurements, not behaviour): the run's shape and its ratios are.
"""

from __future__ import annotations

import json
import os

import pytest
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
