"""Issue 19, section 5: every bad input gets one clear line (exit code 2 from the command line),
before the slow work: no traceback, no hang, nothing accepted silently.

Each case the issue lists is one test (or one parameter of one) here; docs/reliability.md, "Bad
input", states the rules."""

from __future__ import annotations

import json
import math
import time

import pytest
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts import bench as benchmark
from compressed_experts.checkpoint import save_model
from compressed_experts.cli import app
from compressed_experts.evaluation import compare, evaluate
from compressed_experts.evaluation import run as eval_run
from compressed_experts.evaluation.report import load_results, save_results
from compressed_experts.training import TrainConfig

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, " ".join(result.output.split())


def _refused(*args, expect: str) -> str:
    code, text = _cli(*args)
    assert code == 2 and text.startswith("error:") and expect in text, text
    assert text.count("error:") == 1, text
    return text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = ce.from_pretrained("tiny:olmoe", n_ce=2)
    path = tmp_path_factory.mktemp("inputs") / "model"
    save_model(model, path, tokenizer=ce.tiny_tokenizer())
    return path


@pytest.fixture
def no_generation(monkeypatch):
    """Generating is the slow step: every refusal here must come before it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(eval_run, "generate", forbidden)


def _gsm8k(path, *rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# fit, convert, train: settings and sources


def test_fit_with_n_ce_0_is_refused_before_reading_text_or_weights(tmp_path, monkeypatch):
    from compressed_experts.cli import model as model_cli

    monkeypatch.setattr(model_cli, "calibration_blocks", lambda *a, **k: pytest.fail("read the calibration text"))
    text = _refused("fit", "tiny:olmoe", "--n-ce", "0", "--out", tmp_path / "f", expect="nothing to fit")
    assert "--n-ce" in text
    with pytest.raises(ce.CompressedExpertsError, match="n_ce 0 replaces no experts"):  # the library, too
        ce.fit(ce.from_pretrained("tiny:olmoe", n_ce=0), ce.tiny_tokenizer()("abc", return_tensors="pt")["input_ids"])


def test_train_with_a_tokenizer_larger_than_the_models_vocabulary(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Add 1 and 2.", "output": "3"}) + "\n")
    text = _refused(
        "train",
        "--model",
        "tiny:olmoe",
        "--tokenizer",
        "bundled",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        expect="4096 tokens but the model tiny:olmoe only 128 embeddings",
    )
    assert "--tokenizer" in text and not (tmp_path / "run").exists()
    # The library's train() refuses it too, before reading the data (a file that is not there).
    config = ce.TrainConfig(
        model="tiny:olmoe", tokenizer="bundled", data=str(tmp_path / "no.jsonl"), out=str(tmp_path / "lib")
    )
    with pytest.raises(ce.CompressedExpertsError, match="4096 tokens but the model tiny:olmoe only 128 embeddings"):
        ce.train(config)


def test_train_seq_len_1_is_refused_when_the_settings_are_built(tmp_path):
    with pytest.raises(ce.CompressedExpertsError, match="seq_len must be at least 2"):
        TrainConfig(model="tiny:olmoe", data="d.jsonl", out=str(tmp_path / "run"), seq_len=1)
    _refused(
        "train",
        "--model",
        "tiny:olmoe",
        "--data",
        "d.jsonl",
        "--out",
        tmp_path / "r",
        "--seq-len",
        "1",
        expect="--seq-len must be at least 2",
    )


@pytest.mark.parametrize("source", ["./nope", "../nope/x", "nope"])
def test_a_missing_model_path_is_named_as_missing_not_as_a_bad_hub_id(tmp_path, source):
    text = _refused("convert", source, "--n-ce", "2", "--out", tmp_path / "c", expect="no such model directory")
    assert "Repo id" not in text


def test_eval_of_a_missing_model_says_so():
    _refused("eval", "--model", "/no/model", "--task", "gsm8k", expect="no such model directory: /no/model")


def test_convert_into_the_working_directory_is_refused_before_converting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused("convert", "tiny:olmoe", "--n-ce", "2", "--out", ".", expect="is the working directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "tiny:olmoe", "--n-ce", "2"],
        ["fit", "tiny:olmoe", "--n-ce", "2"],
        ["train", "--model", "tiny:olmoe", "--data", "d.jsonl"],
        ["demo", "--quick"],
        ["toy", "forms", "--quick"],
        ["toy", "methods", "--quick"],
    ],
)
def test_an_existing_file_as_output_folder_is_refused(tmp_path, command):
    file = tmp_path / "afile"
    file.write_text("mine")
    _refused(*command, "--out", file, expect="is a file; give a directory")
    assert file.read_text() == "mine"


@pytest.mark.parametrize("command", [["demo", "--quick"], ["toy", "forms", "--quick"], ["toy", "methods", "--quick"]])
def test_a_report_that_is_a_folder_is_refused_before_the_run(tmp_path, command):
    _refused(*command, "--out", tmp_path / "out", "--report", tmp_path, expect="is a folder")
    assert not (tmp_path / "out").exists()


# eval: data, settings, prompts


def test_eval_data_of_binary_garbage(tmp_path, model_dir, no_generation):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)) * 8)
    _refused("eval", "--model", model_dir, "--task", "gsm8k", "--data", garbage, expect="is not a text file")
    garbage.write_bytes(b'{"question": "\xff\xfe"}\n')
    _refused("eval", "--model", model_dir, "--task", "gsm8k", "--data", garbage, expect="is not UTF-8 text")


@pytest.mark.parametrize(
    ("task", "row", "expect"),
    [
        ("gsm8k", {"question": 5, "answer": "#### 5"}, "question is a number"),
        ("gsm8k", {"question": "1+1?", "answer": ["#### 2"]}, "answer is a list"),
        ("math", {"problem": "x?", "solution": None}, "solution is null"),
        ("mbpp", {"text": "f", "test_list": "assert f()"}, "test_list is a"),
        ("mbpp", {"text": "f", "test_list": [1, 2]}, "needs a list of texts"),
    ],
)
def test_eval_records_of_the_wrong_types_are_refused_before_generating(tmp_path, no_generation, task, row, expect):
    data = _gsm8k(tmp_path / "data.jsonl", row)
    with pytest.raises(ce.CompressedExpertsError, match=expect) as caught:
        evaluate(ce.tiny_model("olmoe"), ce.tiny_tokenizer(), task, data=data, progress=False)
    assert "line 1" in str(caught.value)


def test_a_200000_word_question_is_refused_before_generating(tmp_path, no_generation):
    data = _gsm8k(tmp_path / "long.jsonl", {"question": " ".join(["word"] * 200_000), "answer": "#### 1"})
    model = ce.tiny_model("olmoe")
    start = time.perf_counter()
    with pytest.raises(ce.CompressedExpertsError, match=r"example 1 is [\d,]+ tokens, and the model takes 128"):
        evaluate(model, ce.tiny_tokenizer(), "gsm8k", data=data, prompt="plain", progress=False)
    assert time.perf_counter() - start < 30


def test_a_prompt_just_past_the_positions_is_refused_and_one_within_is_not(tmp_path, monkeypatch):
    model, tokenizer = ce.tiny_model("olmoe"), ce.tiny_tokenizer()
    monkeypatch.setattr(eval_run, "generate", lambda model, tok, prompts, *a, **k: ["#### 1"] * len(prompts))
    data = _gsm8k(tmp_path / "d.jsonl", {"question": "1", "answer": "#### 1"})
    assert evaluate(model, tokenizer, "gsm8k", data=data, prompt="plain", progress=False)["score"] == 1.0
    _gsm8k(data, {"question": "1" * 200, "answer": "#### 1"})
    with pytest.raises(ce.CompressedExpertsError, match="leaving no room for an answer"):
        evaluate(model, tokenizer, "gsm8k", data=data, prompt="plain", progress=False)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_eval_temperature_must_be_0_or_more(value):
    _refused("eval", "--model", "tiny:olmoe", "--task", "gsm8k", "--temperature", value, expect="--temperature")


# compare


def _result(**changes):
    result = {
        "task": "gsm8k",
        "metric": "exact_match",
        "score": 0.5,
        "n": 2,
        "settings": {"data": "d.jsonl", "limit": None},
        "model": {"source": "m", "method": "full", "n_ce": 0, "top_k": 8, "active_parameters": 1000},
        "examples": [],
    }
    for key, value in changes.items():
        if key.startswith("model_"):
            result["model"][key[6:]] = value
        else:
            result[key] = value
    return result


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"score": "0.5"}, "score"),
        ({"score": 5.0}, "score"),
        ({"score": math.nan}, "score"),
        ({"score": -0.1}, "score"),
        ({"n": "2"}, "n"),
        ({"settings": []}, "settings"),
        ({"examples": {}}, "examples"),
        ({"task": 3}, "task"),
        ({"model": []}, "model"),
        ({"model_source": ["m"]}, "model.source"),
        ({"model_method": "half"}, "model.method"),
        ({"model_n_ce": "2"}, "model.n_ce"),
        ({"model_top_k": 8.5}, "model.top_k"),
        ({"model_active_parameters": "1000"}, "model.active_parameters"),
    ],
)
def test_compare_refuses_results_of_the_wrong_types_naming_file_and_field(tmp_path, changes, field):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_result(**changes)))  # NaN is written as NaN, as json writes it
    with pytest.raises(ce.CompressedExpertsError, match=rf"{bad}: {field} is ") as caught:
        compare([bad], plot=None)
    assert "\n" not in str(caught.value)
    _refused("compare", bad, "--plot", tmp_path / "p.png", expect=f"{field} is")
    assert not (tmp_path / "p.png").exists()


def test_a_perplexity_results_file_is_still_a_results_file_but_not_compared(tmp_path):
    path = tmp_path / "ppl.json"
    save_results(_result(score=17.5, metric="word_perplexity"), path)
    assert load_results(path)["score"] == 17.5  # eval --overwrite may replace it
    with pytest.raises(ce.CompressedExpertsError, match="not a fraction in"):
        compare([path])


def test_compare_plot_must_be_a_png(tmp_path):
    good = tmp_path / "good.json"
    save_results(_result(), good)
    _refused("compare", good, "--plot", tmp_path / "X.json", expect=".png")
    assert not (tmp_path / "X.json").exists()


# bench


def test_bench_report_only_on_a_folder_of_other_json(tmp_path):
    (tmp_path / "package.json").write_text(json.dumps({"name": "x", "version": "1"}))
    text = _refused(
        "bench",
        "--report-only",
        "--out-dir",
        tmp_path,
        "--doc",
        tmp_path / "B.md",
        expect="package.json is not a result of compressed-experts bench",
    )
    assert "--out-dir" in text and not (tmp_path / "B.md").exists()
    (tmp_path / "package.json").write_text(json.dumps({"device": "cpu", "machine": "m", "rows": [{"ms": 1}]}))
    _refused(
        "bench",
        "--report-only",
        "--out-dir",
        tmp_path,
        "--doc",
        tmp_path / "B.md",
        expect="its rows are not a list of timings",
    )


def test_bench_refuses_a_truncated_result_before_measuring(tmp_path, monkeypatch):
    (tmp_path / "cpu.json").write_text('{"device": "cpu", "machine": "m", "rows": [')
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("measured before checking the results"))
    common = ("--out-dir", tmp_path, "--doc", tmp_path / "B.md")
    _refused("bench", "--report-only", *common, expect="cpu.json is not JSON")
    for device_file in ("cpu.json", "cuda-other.json"):  # this device's file, or another's merged into the report
        if device_file != "cpu.json":
            (tmp_path / "cpu.json").unlink()
            (tmp_path / device_file).write_text("{")
        _refused(
            "bench",
            "--device",
            "cpu",
            "--shapes",
            "olmoe",
            "--no-end-to-end",
            *common,
            expect=f"{device_file} is not JSON",
        )
