"""``eval`` and ``compare``: scoring a model on a task, and the table and plot over results files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import from_pretrained, load_tokenizer
from ..config import check_dtype_name
from ..errors import CompressedExpertsError
from ..evaluation.report import compare, comparison_table
from ..evaluation.run import check_task_name, evaluate
from .app import app
from .common import DEVICE_HELP, DTYPE_HELP, check_device, console, run


def _load(source: str, tokenizer_source: str | None, dtype: str, device: str):
    """The model and its tokenizer (checked first: it is the quicker to fail), on ``device``."""
    device = check_device(device)
    tokenizer = load_tokenizer(tokenizer_source or source)
    with console.status(f"loading {source}"):
        model = from_pretrained(source, dtype=dtype)
    return model.to(device).eval(), tokenizer


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="Model directory, hub id, or tiny:<family>.")],
    task: Annotated[str, typer.Option(help="gsm8k, math, humaneval, mbpp, or lm-eval:<task> (e.g. lm-eval:arc_easy).")],
    data: Annotated[
        Path | None, typer.Option(help="Local JSONL in the data set's format (lm-eval: a task YAML or folder).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N examples only.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer; default: the task's own.")] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="alpaca or chat (fine-tuned models; default: as trained, per the model directory's training_config.json, else alpaca), fewshot (base models; gsm8k, math) or plain."
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds each generated program may run (humaneval, mbpp).")] = 10.0,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples for lm-eval tasks.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer source, where the model directory has none.")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    out: Annotated[Path | None, typer.Option(help="Results JSON: score, settings and every example.")] = None,
) -> None:
    """Score a model on a task (math, code, or any lm-evaluation-harness task)."""

    def action() -> None:
        check_task_name(task)
        check_dtype_name(dtype, "dtype")
        if out is not None and out.is_dir():
            raise CompressedExpertsError(f"--out {out} is a folder; give a file name such as {out / 'results.json'}")
        loaded, tok = _load(model, tokenizer, dtype, device)
        result = evaluate(
            loaded,
            tok,
            task,
            data=data,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt=prompt,
            temperature=temperature,
            timeout=timeout,
            num_fewshot=num_fewshot,
            out=out,
            source=model,
        )
        console.print(f"{task}: {result['metric']} [bold]{result['score']:.1%}[/] on {result['n']} examples")
        if out is not None:
            console.print(f"wrote {out}")

    run(action)


@app.command("compare")
def compare_command(
    results: Annotated[list[Path], typer.Argument(help="Results files written by `compressed-experts eval --out`.")],
    plot: Annotated[
        Path, typer.Option(help="Where to write the plot of score against active parameters (PNG).")
    ] = Path("comparison.png"),
    reference: Annotated[
        str | None,
        typer.Option(
            help="Source of the full top-k model that recovery is measured against, where the results hold several."
        ),
    ] = None,
) -> None:
    """Table of methods, active parameters, scores and recovery; plot of score against active parameters."""

    def action() -> None:
        comparison = compare(results, plot=plot, reference=reference)
        console.print(comparison_table(comparison))
        if comparison["reference"] is None:
            candidates = [row["source"] for row in comparison["rows"] if row["method"] == "full"]
            console.print(
                f"recovery needs one full top-k model as its reference: choose it with --reference "
                f"(candidates: {', '.join(candidates)})"
                if candidates
                else "recovery needs a full top-k model among the results: evaluate the unmodified model too"
            )
        console.print(f"wrote {plot}")

    run(action)
