"""``compressed-experts serve``: the vLLM server command it builds (no vLLM needed: --dry-run), and what
is refused before vLLM starts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app
from compressed_experts.errors import CompressedExpertsError
from compressed_experts.serving.server import server_command
from compressed_experts.sources import BUNDLED_DIR


def test_cpu_command_sets_the_cpu_settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    command = server_command("bundled", port=8123, dtype="float32", max_model_len=256, cpu=True)
    argv = command.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(BUNDLED_DIR)
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--max-model-len") + 1] == "256"
    assert "--enforce-eager" in argv and "--tensor-parallel-size" not in argv
    assert command.env == {"VLLM_CPU_KVCACHE_SPACE": "2"}


def test_gpu_command_compiles_and_splits(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    command = server_command("bundled", tensor_parallel_size=2, cpu=False, extra=["--max-num-seqs", "64"])
    assert "--enforce-eager" not in command.argv and command.env == {}
    assert command.argv[command.argv.index("--tensor-parallel-size") + 1] == "2"
    assert command.argv[-2:] == ["--max-num-seqs", "64"]
    assert server_command("bundled", cpu=True).env == {}  # the user's own KV-cache size wins


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("tiny:olmoe", {}, "save it first"),
        ("bundled", {"dtype": "float64"}, "dtype must be"),
        ("bundled", {"port": 0}, "--port"),
        ("bundled", {"tensor_parallel_size": 0}, "--tensor-parallel-size"),
    ],
)
def test_mistakes_are_refused_before_vllm_starts(source, kwargs, message):
    with pytest.raises(CompressedExpertsError, match=message):
        server_command(source, **kwargs)


def test_cli_dry_run_prints_the_command(tmp_path):
    result = CliRunner().invoke(app, ["serve", "bundled", "--port", "8124", "--max-num-seqs", "4", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "vllm.entrypoints.openai.api_server" in result.output and "--max-num-seqs 4" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "empty"), "--dry-run"])
    assert result.exit_code == 2 and "no config.json" in result.output


def _eval(*args: str):
    return CliRunner().invoke(app, ["eval", "--task", "gsm8k", *args])


def test_eval_engine_mistakes_are_refused_before_the_model_loads(monkeypatch):
    import compressed_experts.serving.engine as engine

    result = _eval("--model", "bundled", "--engine", "sglang")
    assert result.exit_code == 2 and "--engine must be one of transformers, vllm, not 'sglang'" in result.output
    monkeypatch.setattr(engine, "vllm_available", lambda: False)
    result = _eval("--model", "bundled", "--engine", "vllm")
    assert result.exit_code == 2 and "needs vLLM beside this package: see docs/serving.md" in result.output
    assert "'.[serve]'" in result.output  # brackets in a message are shown as text, not taken as markup
    monkeypatch.setattr(engine, "vllm_available", lambda: True)
    result = _eval("--model", "tiny:olmoe", "--engine", "vllm")
    assert result.exit_code == 2 and "save it first" in result.output


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A compressed-experts checkpoint (tiny OLMoE, n_ce 4), saved."""
    out = tmp_path_factory.mktemp("converted") / "model"
    ce.from_pretrained("tiny:olmoe", n_ce=4).save_pretrained(out)
    return out


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module, with this package installed where vLLM looks (its entry point) and VLLM_PLUGINS unset."""
    from compressed_experts.serving import vllm_plugin

    entry = SimpleNamespace(name=vllm_plugin.PLUGIN)
    monkeypatch.setattr(vllm_plugin, "entry_points", lambda group: [entry] if group == vllm_plugin.GROUP else [])
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    return vllm_plugin


def _config_only(folder: Path, **config) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_what_vllm_would_refuse_is_refused_before_it_starts(converted, plugin, tmp_path, monkeypatch):
    """A compressed checkpoint vLLM would refuse for want of the plugin, or of a family it does not
    serve, is refused by serve (and eval and bench, through check_servable) with what to do."""
    installed = plugin.entry_points
    server_command(str(converted), cpu=True)  # the plugin is loaded and serves OLMoE
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(
        CompressedExpertsError, match="leaves out 'compressed_experts'.*VLLM_PLUGINS=compressed_experts,"
    ):
        server_command(str(converted), cpu=True)
    server_command("bundled", cpu=True)  # a plain checkpoint: vLLM serves it without the plugin
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setattr(plugin, "entry_points", lambda group: [])
    with pytest.raises(CompressedExpertsError, match=r"not installed .*pip install -e \."):
        server_command(str(converted), cpu=True)
    monkeypatch.setattr(plugin, "entry_points", installed)

    foo = _config_only(
        tmp_path / "foo", model_type="compressed_experts", architectures=["CompressedExpertsFooMoeForCausalLM"]
    )
    plain = _config_only(tmp_path / "plain", model_type="foo_moe", architectures=["FooMoeForCausalLM"])
    with pytest.raises(
        CompressedExpertsError, match="CompressedExpertsFooMoeForCausalLM .* does not serve .*--engine transformers"
    ):
        plugin.check_servable(str(foo))
    plugin.check_servable(str(plain))  # vLLM's own business
    with pytest.raises(CompressedExpertsError, match="does not serve"):  # what bench would convert it to
        plugin.check_servable(str(plain), converted=True)
    plugin.check_servable("org/some-model")  # a hub id: not read here


def test_cli_refusals_say_what_to_do(converted, plugin, monkeypatch):
    import compressed_experts.serving.engine as engine

    monkeypatch.setenv("VLLM_PLUGINS", "")
    result = CliRunner().invoke(app, ["serve", str(converted), "--dry-run"])
    assert result.exit_code == 2 and "leaves out 'compressed_experts'" in result.output
    monkeypatch.setattr(engine, "vllm_available", lambda: True)
    result = _eval("--model", str(converted), "--engine", "vllm")
    assert result.exit_code == 2 and "leaves out 'compressed_experts'" in result.output


def test_per_token_rule_checkpoints_are_taken_and_unreadable_settings_refused(plugin, tmp_path):
    """``serve`` (and ``eval``/``bench --engine vllm``, through check_servable) takes a checkpoint saved with
    a per-token rule; compressed-experts settings the plugin cannot read (a newer format, none, settings
    per MoE block) are refused before vLLM starts."""
    ruled = tmp_path / "top-p"
    ce.from_pretrained("tiny:olmoe", top_p=0.7).save_pretrained(ruled)
    assert server_command(str(ruled), cpu=True).argv[-1] == "--enforce-eager"
    result = CliRunner().invoke(app, ["serve", str(ruled), "--dry-run"])
    assert result.exit_code == 0, result.output
    config = json.loads((ruled / "config.json").read_text())
    assert config["compressed_experts"]["top_p"] == 0.7
    for section, message in [
        ({**config["compressed_experts"], "format_version": 99}, "newer than this library's.*upgrade"),
        (None, "no compressed_experts section"),
    ]:
        (ruled / "config.json").write_text(json.dumps({**config, "compressed_experts": section}))
        with pytest.raises(CompressedExpertsError, match=f"top-p: vLLM's plugin cannot serve it: .*{message}"):
            server_command(str(ruled), cpu=True)
    planned = tmp_path / "planned"  # settings per MoE block (a plan): served (tests/serving/test_serving_vllm.py)
    plan = (ce.CEConfig(n_ce=2, form="ia3"), ce.CEConfig(top_p=0.7, form="none"))
    ce.convert(ce.from_pretrained("tiny:olmoe"), plan).save_pretrained(planned)
    server_command(str(planned), cpu=True)  # read before vLLM starts, and taken
    config = json.loads((planned / "config.json").read_text())
    bad = {**config["compressed_experts"], "layers": [{"n_ce": 2, "form": "nope"}] * 2}
    (planned / "config.json").write_text(json.dumps({**config, "compressed_experts": bad}))
    with pytest.raises(CompressedExpertsError, match="planned: vLLM's plugin cannot serve it: .*nope"):
        server_command(str(planned), cpu=True)


def test_bench_rule_mistakes_are_refused_before_anything_runs():
    """``bench --engine vllm --top-p P`` adds a rule variant; a rule for the layers bench, two rules or a
    bad value are refused at once (no vLLM needed to say so)."""
    for extra, message in [
        (["--top-p", "0.7"], "--top-p and --skip-below are for --engine vllm"),
        (["--engine", "vllm", "--top-p", "0.7", "--skip-below", "0.3"], "give --top-p or --skip-below, not both"),
        (["--engine", "vllm", "--skip-below", "1.5"], "--skip-below is a fraction"),
    ]:
        result = CliRunner().invoke(app, ["bench", *extra])
        assert result.exit_code == 2 and message in result.output, result.output
