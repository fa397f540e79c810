"""Final answers out of free text, and when two answers count as the same.

GSM8K answers are numbers, compared by value ("1,000", "$1000.00" and "1000 dollars" are one
answer). MATH answers are LaTeX, taken from the last ``\\boxed{...}`` and compared after a light
normalisation (listed in :func:`normalise_latex`); numbers written two ways ("0.5",
``\\frac{1}{2}``, "1/2") are compared by value. Anything subtler (equivalent expressions,
intervals written differently) counts as wrong, as in the usual exact-match scoring.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A minus sign only where it cannot be subtraction ("5-3" is 5 and 3); thousands grouped by
# commas only in threes, so that a list "1,2,3" is three numbers.
_NUMBER = re.compile(r"(?:(?<![\w)\]}])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])\.\d+")
#: Where a solution states its final answer, most explicit first: GSM8K's own "#### 42", then "the answer is 42".
_ANSWER_MARKERS = (re.compile(r"####"), re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE))


def _clean(number: str) -> str:
    return number.strip().replace(",", "").replace("$", "").replace("\u2212", "-").rstrip("%").rstrip(".")


def number_value(text: str) -> Fraction | None:
    """The value of one number as written: commas, ``$``, a unicode minus and a trailing ``%`` allowed."""
    try:
        return Fraction(_clean(text))
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> str | None:
    """The final numeric answer of a solution, without commas or ``$``, or None.

    Takes the first number after the last ``####`` if there is one, else after the last "the
    answer is", else the last number in the text.
    """
    for marker in _ANSWER_MARKERS:
        found = list(marker.finditer(text))
        match = _NUMBER.search(text, found[-1].end()) if found else None
        if match:
            return _clean(match.group())
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def numbers_match(prediction: str | None, target: str) -> bool:
    """Whether two numbers are equal in value ("42.0" == "42", "1/2" == "0.5")."""
    if prediction is None:
        return False
    a, b = number_value(prediction), number_value(target)
    return a is not None and a == b


def _closing(text: str, start: int) -> int | None:
    """Index of the brace that closes the one at ``text[start]``, or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; ``\\boxed 5`` too."""
    at, command = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
    if at < 0:
        return None
    start = at + len(command)
    if not text.startswith("{", start):
        match = re.match(r"\s+([^\s$]+)", text[start:])
        return match.group(1) if match else None
    end = _closing(text, start)
    return text[start + 1 : end] if end is not None else None  # None: cut off inside the box


def _unwrap(text: str, command: str) -> str:
    """``\\command{X}`` -> ``X`` for every occurrence."""
    while (at := text.find(command + "{")) >= 0:
        start = at + len(command)
        end = _closing(text, start)
        if end is None:
            return text
        text = text[:at] + text[start + 1 : end] + text[end + 1 :]
    return text


def normalise_latex(answer: str) -> str:
    """A light canonical form of a LaTeX answer, so that typography does not decide correctness.

    Drops ``\\left``/``\\right``, ``{,}`` in numbers, thin spaces (``\\!``, ``\\,``, ``\\;``), ``$``, degrees
    (``^\\circ``), percent signs, a unit in ``\\text{...}``/``\\mbox{...}`` after a number
    (other ``\\text{X}`` become X), all whitespace, a trailing period and a leading ``x =``;
    writes ``\\dfrac``/``\\tfrac`` as ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``\\sqrt2`` as
    ``\\sqrt{2}`` and ``.5`` as ``0.5``; and removes braces around the whole answer.
    """
    text = answer.strip()
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("{,}", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\$", ""),
        ("$", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\%", ""),
        ("%", ""),
    ):
        text = text.replace(old, new)
    unit = re.fullmatch(r"(.*[\d}])\s*\\(?:text|mbox)\{[^{}]*\}", text, re.DOTALL)
    text = unit.group(1) if unit else text
    for command in ("\\text", "\\textbf", "\\mbox", "\\mathrm"):
        text = _unwrap(text, command)
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = re.sub(r"^[a-zA-Z]=", "", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", text)
    text = re.sub(r"(?<!\d)\.(\d)", r"0.\1", text)
    while text.startswith("{") and _closing(text, 0) == len(text) - 1:
        text = text[1:-1]
    return text


def _latex_value(text: str) -> Fraction | None:
    """The value of a normalised answer that is a plain number or fraction, else None."""
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    if match:
        sign, top, bottom = match.groups()
        return None if int(bottom) == 0 else Fraction(int(top), int(bottom)) * (-1 if sign else 1)
    plain = re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+)(?:/\d+)?", text)
    return number_value(text) if plain else None


def latex_match(prediction: str | None, target: str) -> bool:
    """Whether two LaTeX answers agree after :func:`normalise_latex` (numbers by value)."""
    if prediction is None:
        return False
    a, b = normalise_latex(prediction), normalise_latex(target)
    if a == b:
        return True
    value_a, value_b = _latex_value(a), _latex_value(b)
    return value_a is not None and value_a == value_b
