"""Evaluation: task quality of plain, top-m and compressed-experts models, and their comparison.

    from compressed_experts.evaluation import evaluate, compare
    result = evaluate(model, tokenizer, "gsm8k", limit=100, out="results/ce-gsm8k.json")
    compare(["results/full-gsm8k.json", "results/ce-gsm8k.json"], plot="results/quality.png")

Built-in tasks (:data:`TASKS`): gsm8k, math, humaneval, mbpp; and ``lm-eval:<task>`` for any
lm-evaluation-harness task. Each results file keeps every example's prompt, output and verdict.
"""

from .prompts import alpaca_prompt
from .report import compare, comparison_table, load_results
from .run import EvalConfig, evaluate, model_summary
from .sandbox import run_program
from .tasks import TASKS

__all__ = [
    "TASKS",
    "alpaca_prompt",
    "compare",
    "comparison_table",
    "EvalConfig",
    "evaluate",
    "load_results",
    "model_summary",
    "run_program",
]
