"""lm-evaluation-harness tasks through lm-eval's HF wrapper, on custom task files that need no network."""

from __future__ import annotations

import json

import pytest

import compressed_experts as ce
from compressed_experts.evaluation import evaluate, load_results

QUESTIONS = [
    {"question": "1 + 1", "choices": ["2", "3"], "label": 0, "answer": "2"},
    {"question": "2 + 2", "choices": ["5", "4"], "label": 1, "answer": "4"},
    {"question": "3 + 3", "choices": ["6", "7"], "label": 0, "answer": "6"},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice and a generation task over one small local data file."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "sums_choice.yaml").write_text(
        "task: sums_choice\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "sums_written.yaml").write_text(
        "task: sums_written\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def model():
    return ce.from_pretrained("tiny:olmoe", n_ce=4)


def test_multiple_choice_task(model, tasks, tmp_path):
    out = tmp_path / "choice.json"
    result = evaluate(model, ce.tiny_tokenizer(), "lm-eval:sums_choice", data=tasks / "sums_choice.yaml",
                      batch_size=2, out=out, progress=False)
    assert (result["task"], result["metric"], result["n"]) == ("lm-eval:sums_choice", "acc", 3)
    assert result["score"] == pytest.approx(sum(e["correct"] for e in result["examples"]) / 3)
    first = result["examples"][0]
    assert first["prompt"] == "Q: 1 + 1\nA:" and first["target"] == " 2" and first["output"] in (" 2", " 3")
    assert result["model"]["method"] == "ce" and result["settings"]["lm_eval_version"]
    assert load_results(out) == result


def test_generation_task(model, tasks):
    result = evaluate(model, ce.tiny_tokenizer(), "lm-eval:sums_written", data=tasks, limit=2, progress=False)
    assert (result["metric"], result["n"]) == ("exact_match", 2)
    assert all(isinstance(e["output"], str) and e["target"] in ("2", "4") for e in result["examples"])


def test_unknown_lm_eval_task_suggests_close_names(model, tasks):
    with pytest.raises(ce.CompressedExpertsError, match="no lm-eval task 'sums_choise' in .*did you mean sums_choice"):
        evaluate(model, ce.tiny_tokenizer(), "lm-eval:sums_choise", data=tasks)
