"""The ``compressed-experts`` command: a thin layer over the library's public functions."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .checkpoint import from_pretrained, skeleton
from .errors import CompressedExpertsError
from .parameters import describe

app = typer.Typer(
    help="Compressed experts for Mixture-of-Experts LMs: run fewer full experts per token.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

SourceArg = Annotated[
    str, typer.Argument(help="Model directory, hub id, or tiny:<family> (tiny random model, e.g. tiny:olmoe).")
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


def _show(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("family", "moe_blocks", "experts", "top_k", "n_ce", "main_experts_per_token"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    for key in ("total", "active", "active_full_topk"):
        table.add_row(f"{key.replace('_', ' ')} parameters", f"{summary[key]:,}")
    table.add_row("active saving", f"{summary['active_saving']:.1%}")
    for key in ("embeddings", "attention", "routers", "main_experts", "shared_experts", "compressed_experts", "other"):
        table.add_row(f"  active: {key.replace('_', ' ')}", f"{summary[key]:,}")
    console.print(table)


def _run(action) -> None:
    """Turn the library's user errors into one red line and exit code 2, not a traceback."""
    try:
        action()
    except CompressedExpertsError as err:
        _fail(str(err))


@app.command()
def info(source: SourceArg) -> None:
    """Family, experts, top-k, n_ce, and total and active parameters (reads the config only)."""
    _run(lambda: _show(describe(skeleton(source)), source))


@app.command()
def convert(
    source: SourceArg,
    n_ce: Annotated[int, typer.Option("--n-ce", help="Routed experts per token replaced by compressed experts.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the converted model to.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds files.")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype: auto (as saved), float32, bfloat16, float16.")] = "auto",
) -> None:
    """Convert an MoE checkpoint to compressed experts and save it (with its tokenizer, if any)."""

    def action() -> None:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise CompressedExpertsError(f"{out} is not empty: choose another --out or pass --overwrite")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise CompressedExpertsError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        with console.status(f"loading {source}"):
            model = from_pretrained(source, n_ce=n_ce, dtype=dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Write next to the target, then swap in: an interrupted save never leaves a half model at --out.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            with console.status(f"saving to {out}"):
                model.save_pretrained(staging)
                _save_tokenizer(source, staging)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _show(describe(model), f"{source} -> {out}")

    _run(action)


def _save_tokenizer(source: str, directory: Path) -> None:
    """Copy the source's tokenizer along, so the converted directory is usable on its own."""
    if source.startswith("tiny:"):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        console.print(f"[yellow]note:[/] no tokenizer found at {source}; saved the model alone")
        return
    tokenizer.save_pretrained(directory)
