"""lm-evaluation-harness tasks through lm-eval's HF wrapper, on custom task files that need no network."""

from __future__ import annotations

import json

import pytest
import torch

import compressed_experts as ce
from compressed_experts.evaluation import evaluate, load_results

QUESTIONS = [
    {"question": "1 + 1", "choices": ["2", "3"], "label": 0, "answer": "2"},
    {"question": "2 + 2", "choices": ["5", "4"], "label": 1, "answer": "4"},
    {"question": "3 + 3", "choices": ["6", "7"], "label": 0, "answer": "6"},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice task over a small local data file."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "sums_choice.yaml").write_text(
        "task: sums_choice\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def model():
    return ce.from_pretrained("tiny:olmoe", n_ce=4)


def _prompt(question: dict) -> str:
    return f"Q: {question['question']}\nA:"  # doc_to_text of both tasks


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) from the model's own logits, in float64: the sum over the
    continuation's tokens of the log-softmax at the position before each."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    ids = tokenizer.encode(context + continuation, add_special_tokens=False)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def _greedy(model, tokenizer, prompt: str, new_tokens: int, until: str = "\n") -> str:
    """Greedy decoding by hand (argmax of the last position, whole sequence each step), cut at ``until``."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    start = len(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[start:], skip_special_tokens=True).split(until)[0]


def test_multiple_choice_task(model, tasks, tmp_path):
    tokenizer = ce.tiny_tokenizer()
    # What acc must be: per question, the choice (after lm-eval's " " target delimiter) with the
    # highest log-likelihood under the model, and the share of questions where that is the label.
    chosen = []
    for q in QUESTIONS:
        scores = [_loglikelihood(model, tokenizer, _prompt(q), " " + c) for c in q["choices"]]
        assert abs(scores[0] - scores[1]) > 0.05  # no near-tie that float rounding could flip
        chosen.append(max(range(len(scores)), key=scores.__getitem__))
    expected_acc = sum(c == q["label"] for c, q in zip(chosen, QUESTIONS)) / len(QUESTIONS)
    assert 0 < expected_acc < 1  # the model gets some right and some wrong, so a constant score fails

    out = tmp_path / "choice.json"
    result = evaluate(
        model, tokenizer, "lm-eval:sums_choice", data=tasks / "sums_choice.yaml", batch_size=2, out=out, progress=False
    )
    assert (result["task"], result["metric"], result["n"]) == ("lm-eval:sums_choice", "acc", 3)
    assert result["score"] == pytest.approx(expected_acc, abs=1e-12)
    assert [e["prompt"] for e in result["examples"]] == [_prompt(q) for q in QUESTIONS]
    assert [e["target"] for e in result["examples"]] == [" " + q["choices"][q["label"]] for q in QUESTIONS]
    assert [e["output"] for e in result["examples"]] == [" " + q["choices"][c] for q, c in zip(QUESTIONS, chosen)]
    assert [e["correct"] for e in result["examples"]] == [c == q["label"] for c, q in zip(chosen, QUESTIONS)]
    assert result["model"]["method"] == "ce" and result["settings"]["lm_eval_version"]
    assert load_results(out) == result


def test_generation_task(model, tmp_path):
    """exact_match of greedy generations, on data whose first and third answers are made to be
    what the model writes (worked out here by hand-rolled greedy decoding) and whose second is not."""
    tokenizer = ce.tiny_tokenizer()
    written = [_greedy(model, tokenizer, _prompt(q), new_tokens=4) for q in QUESTIONS]
    answers = [written[0], QUESTIONS[1]["answer"], written[2]]
    assert written[1] != answers[1]  # so exact_match must be 2/3
    data = tmp_path / "written.jsonl"
    data.write_text("".join(json.dumps({**q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    (tmp_path / "written.yaml").write_text(
        f"task: sums_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    result = evaluate(model, tokenizer, "lm-eval:sums_echo", data=tmp_path / "written.yaml", progress=False)
    assert (result["metric"], result["n"]) == ("exact_match", 3)
    assert [e["output"] for e in result["examples"]] == written
    assert [e["target"] for e in result["examples"]] == answers
    assert [e["correct"] for e in result["examples"]] == [True, False, True]
    assert result["score"] == pytest.approx(2 / 3, abs=1e-12)


def test_unknown_lm_eval_task_suggests_close_names(model, tasks):
    with pytest.raises(ce.CompressedExpertsError, match="no lm-eval task 'sums_choise' in .*did you mean sums_choice"):
        evaluate(model, ce.tiny_tokenizer(), "lm-eval:sums_choise", data=tasks)
