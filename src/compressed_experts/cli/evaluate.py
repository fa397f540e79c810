"""``eval`` and ``compare``: scoring a model on a task, and the table and plot over results files."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..checkpoint import from_pretrained, load_tokenizer, output_lock, skeleton
from ..config import check_dtype_name
from ..errors import CompressedExpertsError
from ..evaluation.harness import PREFIX
from ..evaluation.report import check_results_file, compare, comparison_table
from ..evaluation.run import EvalConfig, check_task_name, evaluate
from ..evaluation.sandbox import PYTHON_GUARD, guard_warning
from ..serving.engine import check_engine
from ..text import check_text_file
from .app import app
from .common import DEVICE_HELP, DTYPE_HELP, check_device, console, options_of, run, settings_options, with_options


def _load(source: str, tokenizer_source: str | None, dtype: str, device: str):
    """The model and its tokenizer (checked first: it is the quicker to fail), on ``device``."""
    device = check_device(device)
    tokenizer = load_tokenizer(tokenizer_source or source)
    with console.status(f"loading {source}"):
        model = from_pretrained(source, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _eval_options(
    model: Annotated[str, typer.Option(help="Model directory, hub id, bundled, or tiny:<family>.")],
    task: Annotated[str, typer.Option(help="gsm8k, math, humaneval, mbpp, or lm-eval:<task> (e.g. lm-eval:arc_easy).")],
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer source, where the model directory has none.")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    out: Annotated[Path | None, typer.Option(help="Results JSON: score, settings and every example.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is a results file already.")] = False,
) -> None:
    """The eval command's own options; the scoring settings come from EvalConfig."""


def eval_command(**options) -> None:
    """Score a model on a task (math, code, or any lm-evaluation-harness task)."""
    scoring = {name: options.pop(name) for name in list(options) if name in EvalConfig.__dataclass_fields__}
    model, task, tokenizer, dtype, device, out, overwrite = (
        options[name] for name in ("model", "task", "tokenizer", "dtype", "device", "out", "overwrite")
    )

    def action() -> None:
        check_task_name(task)
        config = EvalConfig(**scoring)
        check_dtype_name(dtype, "dtype")
        if out is not None:  # before the model loads: not an input, not an existing file unless --overwrite
            sources = {"model": model, "tokenizer": tokenizer, "data": config.data}
            check_results_file(out, overwrite=overwrite, sources=sources)
        if config.data is not None and not task.startswith(PREFIX):  # a JSONL file: readable text, before the model
            data = Path(config.data)
            if not data.is_file():
                raise CompressedExpertsError(f"no such data file: {data}", settings=("data",))
            if data.suffix != ".gz":
                check_text_file(data)
        check_engine(config.engine, model)
        if config.engine == "vllm":  # vLLM reads the weights itself: here only the structure, for the summary
            tok = load_tokenizer(tokenizer or model)
            loaded = skeleton(model)
            loaded = loaded.to(getattr(torch, dtype)) if dtype != "auto" else loaded
        else:
            loaded, tok = _load(model, tokenizer, dtype, device)
        with output_lock(out) if out is not None else nullcontext():  # a second eval to --out fails at once
            result = evaluate(loaded, tok, task, config, out=out, overwrite=overwrite, source=model)
        score = result["score"]  # a fraction as a percentage; another metric (perplexity) as it is
        shown = f"{score:.1%}" if 0 <= score <= 1 else f"{score:.4g}"
        console.print(f"{task}: {result['metric']} [bold]{shown}[/] on {result['n']} examples")
        if result["settings"].get("isolation") == PYTHON_GUARD:
            console.print(f"[bold red]warning:[/] {guard_warning()}", markup=True, highlight=False)
        if out is not None:
            console.print(f"wrote {out}")

    run(action)


app.command("eval")(with_options(eval_command, options_of(_eval_options), settings_options(EvalConfig)))


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
    overwrite: Annotated[bool, typer.Option(help="Replace --plot if it is a PNG already.")] = False,
) -> None:
    """Table of methods, active parameters, scores and recovery; plot of score against active parameters."""

    def action() -> None:
        comparison = compare(results, plot=plot, reference=reference, overwrite=overwrite)
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
