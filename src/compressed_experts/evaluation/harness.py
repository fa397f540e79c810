"""Any lm-evaluation-harness task, run on this library's model through lm-eval's own HF wrapper,
or on the saved model served by vLLM through lm-eval's own vllm model.

The loaded model (plain, top-m or compressed experts) and its tokenizer are handed to lm-eval's
``HFLM`` as objects, so lm-eval's prompts, few-shot handling and metrics apply unchanged.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CompressedExpertsError, first_line
from ..serving.engine import lm_eval_model

PREFIX = "lm-eval:"


def _task_manager(include: str | Path | None):
    """lm-eval's task index; with ``include`` (a task YAML or a folder of them) only those tasks,
    which is quick and needs no network, else lm-eval's own thousands of tasks."""
    from lm_eval.tasks import TaskManager

    if include is None:
        return TaskManager()
    path = Path(include)
    if not path.exists():
        raise CompressedExpertsError(f"no such lm-eval task file or folder: {path}")
    return TaskManager(include_path=str(path.parent if path.is_file() else path), include_defaults=False)


def _check_task(manager, task: str, include: str | Path | None) -> None:
    if task in manager.all_tags:  # a tag only names tasks; lm-eval reports no score for it
        members = ", ".join(sorted(manager.task_index[task].tags))
        raise CompressedExpertsError(f"lm-eval:{task} is a tag of several tasks ({members}); evaluate them one by one")
    if task not in manager.all_tasks:
        where = f"in {include}" if include is not None else "in lm-evaluation-harness"
        close = difflib.get_close_matches(task, manager.all_tasks, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CompressedExpertsError(f"no lm-eval task {task!r} {where}{hint}")


def _primary(entry: dict[str, Any]) -> tuple[str, str]:
    """The task's first metric as lm-eval reports it ("acc,none"), and a readable name ("acc")."""
    for key, value in entry.items():
        if "," in key and "_stderr," not in key and isinstance(value, (int, float)):
            metric, filter_name = key.split(",", 1)
            return key, metric if filter_name == "none" else f"{metric} ({filter_name})"
    raise CompressedExpertsError(f"lm-eval reported no metric: {sorted(entry)}")


def _example(sample: dict[str, Any], metric: str) -> dict[str, Any]:
    """One lm-eval sample in this library's results format."""
    arguments = [tuple(a) for a in sample["arguments"]]
    responses = sample["filtered_resps"]
    if responses and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in responses) and len(arguments) > 1:
        choices = [a[1] for a in arguments]  # multiple choice: the answer is the likeliest choice
        output = choices[max(range(len(responses)), key=lambda i: responses[i][0])]
        target = sample["target"]
        target = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else target
    else:
        output = responses[0] if responses else ""
        target = sample["target"]
    value = sample.get(metric)
    return {
        "prompt": arguments[0][0] if arguments else "",
        "output": output if isinstance(output, str) else repr(output),
        "target": target if isinstance(target, (str, int, float)) else repr(target),
        "prediction": output if isinstance(output, str) else repr(output),
        "correct": bool(value) if isinstance(value, (int, float)) else None,
        "verdict": f"{metric}={value}",
    }


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    include: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    engine: str = "transformers",
    source: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval task ``task`` (e.g. "arc_easy", "mmlu"); return its metric, score, examples and settings.

    ``include`` is a custom task YAML (or a folder of them) to use instead of lm-eval's own tasks.
    ``engine`` "vllm": lm-eval's own vllm model serves the saved ``source`` (in ``model``'s dtype)
    instead of lm-eval's HF wrapper running ``model``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise CompressedExpertsError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval") from err
    manager = _task_manager(include)
    _check_task(manager, task, include)
    try:  # building the task fetches its data: the step that fails offline
        loaded = manager.load([task])
    except (OSError, ValueError) as err:
        raise CompressedExpertsError(
            f"lm-eval cannot load {task} ({first_line(err)}); without network access, point a custom task file "
            f"at local files and pass it as data",
            settings=("data",),
        ) from err
    built = loaded["groups"].get(task) or loaded["tasks"][task]
    if engine == "vllm":
        wrapper = lm_eval_model(source, str(model.dtype).removeprefix("torch."), batch_size)
    else:
        wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=wrapper, tasks=[built], limit=limit, num_fewshot=num_fewshot, task_manager=manager, log_samples=True
    )
    if task not in output["results"]:
        raise CompressedExpertsError(f"lm-eval ran {task} but reported no score for it (a group without an aggregate?)")
    key, metric = _primary(output["results"][task])
    samples = [s for name in sorted(output["samples"]) for s in output["samples"][name]]
    sample_metric = key.split(",", 1)[0]
    return {
        "metric": metric,
        "score": float(output["results"][task][key]),
        "examples": [_example(s, sample_metric) for s in samples],
        "settings": {
            "lm_eval_version": lm_eval.__version__,
            "lm_eval_metrics": {k: v for k, v in output["results"][task].items() if "," in k},
            "num_fewshot": output.get("n-shot", {}).get(task, num_fewshot),
        },
    }
