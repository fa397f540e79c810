"""Prompt templates: the ones fine-tuned models were trained with, and few-shot ones for base models.

A fine-tuned model is evaluated zero-shot with the template it was trained on (``--prompt`` of
training): the Alpaca template of the training pipeline
(:func:`compressed_experts.text.alpaca_prompt`, imported here, not copied), or the
tokenizer's chat template with the instruction as one user turn, as training renders an
instruction record. Base models get few-shot
chain-of-thought prompts; the worked examples below were written for this library (in the style
of GSM8K and MATH, not taken from either data set).
"""

from __future__ import annotations

from ..errors import CompressedExpertsError
from ..text import alpaca_prompt  # noqa: F401  (re-exported: the tasks format prompts with it)

#: Where an Alpaca-style model would start the next turn: generation stops there.
ALPACA_STOP = ("\n### Instruction:",)
#: Stands in for a reply, to find what the chat template writes after one.
_REPLY = "@@reply@@"


def _check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CompressedExpertsError(
            "prompt chat needs a tokenizer with a chat template: give the tokenizer the model was fine-tuned "
            "with (it has one if training used prompt chat), or use prompt alpaca",
            settings=("prompt",),
        )


def chat_prompt(instruction: str, tokenizer) -> str:
    """``instruction`` as the one user turn of a chat in the tokenizer's template, up to where the reply starts."""
    _check_chat_template(tokenizer)
    turn = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def chat_stop(tokenizer) -> tuple[str, ...]:
    """Where the chat template ends a reply (e.g. ``<|im_end|>``): what it writes after one, found by
    rendering one; empty where it writes nothing (then the end-of-sequence token alone stops it)."""
    _check_chat_template(tokenizer)
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    end = rendered.partition(_REPLY)[2].strip()
    return (end,) if end else ()


#: Grade-school word problems with worked answers ending in "The answer is N.".
ARITHMETIC_EXAMPLES = (
    (
        "A baker makes 24 muffins and packs them in boxes of 6. She sells every box for $5. How many "
        "dollars does she make?",
        "24 muffins in boxes of 6 fill 24 / 6 = 4 boxes. At $5 a box she makes 4 * 5 = 20 dollars. The answer is 20.",
    ),
    (
        "Tom has three times as many marbles as Ana, who has 7. Tom then gives 5 marbles to his sister. "
        "How many marbles does Tom have now?",
        "Tom starts with 3 * 7 = 21 marbles. After giving 5 away he has 21 - 5 = 16. The answer is 16.",
    ),
    (
        "A train runs at 60 kilometres per hour for 2.5 hours, then at 40 kilometres per hour for 1 hour. "
        "How many kilometres does it travel?",
        "The first part covers 60 * 2.5 = 150 km and the second 40 * 1 = 40 km, so 150 + 40 = 190 km in all. "
        "The answer is 190.",
    ),
    (
        "A school has 480 students. A quarter of them come by bus, 150 walk, and the rest are driven. "
        "How many students are driven to school?",
        "By bus: 480 / 4 = 120. By bus or on foot: 120 + 150 = 270. Driven: 480 - 270 = 210. The answer is 210.",
    ),
)

#: Competition-style problems with solutions ending in a boxed answer.
COMPETITION_EXAMPLES = (
    ("What is the value of $3^2 + 4^2$?", "$3^2 = 9$ and $4^2 = 16$, so the sum is $9 + 16 = \\boxed{25}$."),
    ("Solve for $x$: $2x + 6 = 14$.", "Subtracting 6 gives $2x = 8$, so $x = \\boxed{4}$."),
    (
        "Write $\\frac{18}{24}$ in lowest terms.",
        "The greatest common divisor of 18 and 24 is 6, so $\\frac{18}{24} = \\boxed{\\frac{3}{4}}$.",
    ),
    ("How many positive divisors does 12 have?", "The divisors are 1, 2, 3, 4, 6 and 12, so there are $\\boxed{6}$."),
)

FEWSHOT_STOP = ("\n\nQuestion:", "\n\nProblem:")


def fewshot_prompt(question: str, examples: tuple[tuple[str, str], ...], ask: str, answer: str) -> str:
    """``examples`` as solved ``ask``/``answer`` pairs, then ``question`` left for the model to solve."""
    shots = "".join(f"{ask}: {q}\n{answer}: {a}\n\n" for q, a in examples)
    return f"{shots}{ask}: {question}\n{answer}:"
