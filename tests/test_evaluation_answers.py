"""Answer extraction and matching on hand-checked outputs, including the formats that trip scorers."""

from __future__ import annotations

import pytest

from compressed_experts.evaluation.answers import final_number, last_boxed, latex_match, normalise_latex, numbers_match
from compressed_experts.evaluation.tasks import TASKS, code_of, math_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Each box holds 2 * 3 = 6 eggs.\n#### 6", "6"),
        ("#### 1,234", "1234"),
        ("The answer is $1,234.50.", "1234.50"),
        ("It drops by 5 degrees, to -3 degrees. The answer is -3", "-3"),
        ("The answer is: 42 apples", "42"),
        ("So 5-3=2", "2"),  # subtraction, not a negative number
        ("the level fell to \u22127", "-7"),  # unicode minus
        ("The answer is 18. She then buys 99 more.", "18"),  # the stated answer beats the last number
        ("We list 1,2,3", "3"),  # not one number 123
        ("a 50% rise", "50"),
        ("about .5 of them", ".5"),
        ("no numbers here", None),
    ],
)
def test_final_number(text, expected):
    assert final_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "target", "same"),
    [
        ("42.0", "42", True),
        ("1234.50", "1234.5", True),
        ("-3", "-3", True),
        (".5", "1/2", True),
        ("42", "43", False),
        ("-3", "3", False),
        (None, "42", False),
    ],
)
def test_numbers_match(prediction, target, same):
    assert numbers_match(prediction, target) is same


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{\\frac{1}{2", None),  # cut off inside the box
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("prediction", "target"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("1/2", "\\frac12"),
        ("-\\frac{3}{4}", "-0.75"),
        ("90^\\circ", "90"),
        ("5\\text{ cm}", "5"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("x = 3", "3"),
        ("\\text{(A)}", "(A)"),
        ("\\$18.00", "18"),
        ("10\\%", "10"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("1{,}000", "1000"),
        ("{4}", "4"),
        ("\\frac{\\sqrt{3}}{2}.", "\\dfrac{\\sqrt{3}}{2}"),
    ],
)
def test_latex_answers_that_match(prediction, target):
    assert latex_match(prediction, target), (normalise_latex(prediction), normalise_latex(target))


@pytest.mark.parametrize(
    ("prediction", "target"),
    [("\\frac{1}{3}", "0.33"), ("2", "3"), ("\\sqrt{2}", "\\sqrt{3}"), ("1,2", "12"), (None, "1")],
)
def test_latex_answers_that_differ(prediction, target):
    assert not latex_match(prediction, target)


def test_math_answer_falls_back_to_the_stated_answer():
    assert math_answer("Thus the area is $\\boxed{12}$.") == "12"
    assert math_answer("The answer is: $\\frac{1}{2}$.") == "\\frac{1}{2}"  # fine-tuned formats without a box
    assert math_answer("I do not know") is None


def test_scoring_gsm8k_and_math_outputs():
    gsm8k = [{"question": "q", "answer": "3 + 4 = 7\n#### 7"}] * 3
    scored = TASKS["gsm8k"].score(gsm8k, ["3 + 4 = 7.\n#### 7", "The answer is 8.", "I give up"], 1.0)
    assert [s[2] for s in scored] == [True, False, False]
    assert [s[3] for s in scored] == ["correct", "wrong", "no answer found"]
    assert scored[0][:2] == ("7", "7")
    math = [{"problem": "p", "solution": "So it is $\\boxed{\\frac{1}{2}}$."}, {"problem": "p", "answer": "90"}]
    scored = TASKS["math"].score(math, ["$\\boxed{0.5}$", "$\\boxed{90^\\circ}$"], 1.0)
    assert [s[2] for s in scored] == [True, True]
    assert scored[0][0] == "\\frac{1}{2}"


def test_code_is_taken_from_a_fence_or_as_it_is():
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert code_of("```\nx = 1\n") == "x = 1\n"  # a fence cut off by the token limit
    assert code_of("    return 1\n") == "    return 1\n"
