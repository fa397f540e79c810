"""The built-in generation tasks: how each one prompts the model, where it stops, and how it scores.

Each task takes examples as dictionaries in its data set's own format (a local JSONL file in
that format works the same as the hub copy) and scores a whole list of outputs at once, so that
code tasks can run their programs in parallel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter

from . import answers, prompts
from .sandbox import Program, run_programs

#: A model continuing a bare Python function has finished it when it starts anything at top level.
_FUNCTION_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
#: ...and a bare Python program (it may define helpers) when it starts testing or closes the docstring it was given.
_PROGRAM_STOP = ("\nassert ", "\nif __name__", "\nprint(", '\n"""')


#: Prompt styles for fine-tuned models (every task takes them; alpaca is the default): the task's
#: instruction in the Alpaca template or in the tokenizer's chat template, as training writes them.
INSTRUCTION_STYLES = ("alpaca", "chat")


@dataclass(frozen=True)
class Task:
    """One generation task.

    ``fields`` lists, for each field an example needs, the names it may have (a local file must
    have one name of each). ``hub`` is (data set, config, split) on the Hugging Face hub, or None
    when the data ships with a package. ``instruction(example)`` is what a fine-tuned model is
    asked (styles :data:`INSTRUCTION_STYLES`). ``stops`` maps each prompt style for base models
    that the task accepts to the strings that end an answer in it (where the next example or the
    next piece of code would start), and ``base_prompt(example, style)`` writes that prompt.
    ``score(examples, outputs, timeout)`` gives each output's (target, prediction, correct, verdict).
    """

    name: str
    metric: str
    fields: tuple[tuple[str, ...], ...]
    hub: tuple[str, str | None, str] | None
    instruction: Callable[[dict], str]
    stops: dict[str, tuple[str, ...]]
    base_prompt: Callable[[dict, str], str]
    max_new_tokens: int
    score: Callable[[Sequence[dict], Sequence[str], float], list[tuple[str, str | None, bool, str]]]

    @property
    def styles(self) -> tuple[str, ...]:
        """The prompt styles the task takes, the default first."""
        return (*INSTRUCTION_STYLES, *self.stops)

    def prompt(self, example: dict, style: str, tokenizer) -> str:
        """The prompt of ``example`` in ``style`` (the tokenizer matters for ``chat`` only)."""
        if style == "alpaca":
            return prompts.alpaca_prompt(self.instruction(example))
        if style == "chat":
            return prompts.chat_prompt(self.instruction(example), tokenizer)
        return self.base_prompt(example, style)

    def stop(self, style: str, tokenizer) -> tuple[str, ...]:
        """The strings that end an answer in ``style``: where the next turn would start."""
        if style == "alpaca":
            return prompts.ALPACA_STOP
        if style == "chat":
            return prompts.chat_stop(tokenizer)
        return self.stops[style]


def _field(example: dict, names: tuple[str, ...]) -> str:
    return next(example[n] for n in names if n in example)


def _question_prompt(ask: str, answer: str, examples: tuple, field: str) -> Callable[[dict, str], str]:
    def prompt(example: dict, style: str) -> str:
        question = example[field]
        if style == "fewshot":
            return prompts.fewshot_prompt(question, examples, ask, answer)
        return f"{ask}: {question}\n{answer}:"

    return prompt


def _score_gsm8k(examples, outputs, timeout):
    scored = []
    for example, output in zip(examples, outputs):
        target = answers.final_number(example["answer"]) or example["answer"]
        prediction = answers.final_number(output)
        correct = answers.numbers_match(prediction, target)
        scored.append((target, prediction, correct, _verdict(prediction, correct)))
    return scored


def math_answer(output: str) -> str | None:
    """The final answer of a MATH solution: the last ``\\boxed{}``, else what follows "The answer is"."""
    boxed = answers.last_boxed(output)
    if boxed is not None:
        return boxed
    found = list(re.finditer(r"answer\s*is\s*:?(.+)", output, re.IGNORECASE))
    return found[-1].group(1).strip().strip("$").rstrip(".").strip("$ ") if found else None


def _score_math(examples, outputs, timeout):
    scored = []
    for example, output in zip(examples, outputs):
        target = example["answer"] if "answer" in example else answers.last_boxed(example["solution"]) or ""
        prediction = math_answer(output)
        correct = answers.latex_match(prediction, target)
        scored.append((target, prediction, correct, _verdict(prediction, correct)))
    return scored


def _verdict(prediction: str | None, correct: bool) -> str:
    return "correct" if correct else "no answer found" if prediction is None else "wrong"


def code_of(output: str) -> str:
    """The code in a model's answer: the first fenced block if there is one (closed or not), else all of it."""
    match = re.search(r"```[\w+-]*[^\S\n]*\n(.*?)(?:```|\Z)", output, re.DOTALL)
    return match.group(1) if match else output


def _humaneval_instruction(example: dict) -> str:
    return f"Complete this Python function.\n\n```python\n{example['prompt'].strip()}\n```"


def _humaneval_plain_prompt(example: dict, style: str) -> str:
    return example["prompt"]


def humaneval_program(example: dict, output: str) -> Program:
    """The problem's prompt with the model's code, to run against the problem's tests.

    A completion that writes the whole function is placed after the prompt (whose function then
    has only its docstring, and is replaced); one that writes the body continues the prompt. The
    tests run apart from the code (:class:`~.sandbox.Program`), with the prompt's own helper
    functions where it compiles alone, and call the code's entry point only.
    """
    code = code_of(output)
    entry = example["entry_point"]
    whole = re.search(rf"^def {re.escape(entry)}\b", code, re.MULTILINE)
    body = f"\n{code}" if whole else code
    tests = f"{example['test']}\n\ncheck({entry})\n"
    try:
        compile(example["prompt"], "<prompt>", "exec")
    except (SyntaxError, ValueError):  # a prompt that stops inside its function: the tests take all from the code
        return Program(f"{example['prompt']}{body}\n", tests)
    return Program(f"{example['prompt']}{body}\n", tests, setup=example["prompt"], calls=(entry,))


def _mbpp_tests(example: dict) -> str:
    return "\n".join(example["test_list"])


def _mbpp_instruction(example: dict) -> str:
    return f"{_field(example, ('text', 'prompt'))}\nIt must pass these tests:\n\n{_mbpp_tests(example)}"


def _mbpp_plain_prompt(example: dict, style: str) -> str:
    return f'"""\n{_field(example, ("text", "prompt"))}\n{_mbpp_tests(example)}\n"""\n'


def mbpp_program(example: dict, output: str) -> Program:
    """The model's code and the problem's set-up code (if any), to run against its asserts (which
    take the set-up's names from their own run of it)."""
    setup = example.get("test_setup_code") or ""
    return Program(f"{code_of(output)}\n\n{setup}\n", _mbpp_tests(example), setup=setup)


def _code_scorer(program: Callable[[dict, str], Program], tests: Callable[[dict], str]):
    def score(examples, outputs, timeout):
        verdicts = run_programs([program(e, o) for e, o in zip(examples, outputs)], timeout)
        return [(tests(e), code_of(o), v == "passed", v) for e, o, v in zip(examples, outputs, verdicts)]

    return score


_QUESTION_STOPS = {"fewshot": prompts.FEWSHOT_STOP, "plain": prompts.FEWSHOT_STOP}

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "gsm8k",
            "exact_match",
            (("question",), ("answer",)),
            ("openai/gsm8k", "main", "test"),
            itemgetter("question"),
            _QUESTION_STOPS,
            _question_prompt("Question", "Answer", prompts.ARITHMETIC_EXAMPLES, "question"),
            512,
            _score_gsm8k,
        ),
        Task(
            "math",
            "exact_match",
            (("problem",), ("answer", "solution")),
            ("HuggingFaceH4/MATH-500", None, "test"),
            itemgetter("problem"),
            _QUESTION_STOPS,
            _question_prompt("Problem", "Solution", prompts.COMPETITION_EXAMPLES, "problem"),
            1024,
            _score_math,
        ),
        Task(
            "humaneval",
            "pass@1",
            (("task_id",), ("prompt",), ("test",), ("entry_point",)),
            None,
            _humaneval_instruction,
            {"plain": _FUNCTION_STOP},
            _humaneval_plain_prompt,
            512,
            _code_scorer(humaneval_program, lambda e: e["test"]),
        ),
        Task(
            "mbpp",
            "pass@1",
            (("text", "prompt"), ("test_list",)),
            ("google-research-datasets/mbpp", "full", "test"),
            _mbpp_instruction,
            {"plain": _PROGRAM_STOP},
            _mbpp_plain_prompt,
            512,
            _code_scorer(mbpp_program, _mbpp_tests),
        ),
    )
}
