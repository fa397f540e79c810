"""What every command shares: the console, one-line errors that name flags, and flags made from settings.

The CLI is a thin layer over the library: a command checks what it can before any slow step,
calls one library function and shows the result. Library errors name settings by their
Python names (``n_ce``, ``out``); :func:`run` shows them as this CLI's flags (``--n-ce``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import CompressedExpertsError

console = Console()

SourceArg = Annotated[
    str, typer.Argument(help="Model directory, hub id, bundled, or tiny:<family> (tiny random model, e.g. tiny:olmoe).")
]


def flag(name: str) -> str:
    """The CLI spelling of a setting: ``n_ce`` -> ``--n-ce``."""
    return "--" + name.replace("_", "-")


def as_flags(err: CompressedExpertsError) -> str:
    """The error's message with the settings it names spelled as flags."""
    message = str(err)
    for name in getattr(err, "settings", ()):
        message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w-])", flag(name), message)
    return message


def fail(message: str) -> typing.NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # a message's [brackets] are text
    raise typer.Exit(code=2)


def run(action: Callable[[], None]) -> None:
    """Turn the library's user errors (and file-system errors) into one red line and exit code 2."""
    try:
        action()
    except CompressedExpertsError as err:
        fail(as_flags(err))
    except OSError as err:
        fail(str(err))


def releasing(out, action: Callable[[], None]) -> Callable[[], None]:
    """``action``, then (however it ends) the release of the lock that the output policy took on
    ``out`` (:func:`compressed_experts.checkpoint.check_output_dir`): held for the whole command,
    so that a second command writing there fails at once, and never after it."""
    from ..checkpoint import release_output

    def released() -> None:
        try:
            action()
        finally:
            if out is not None:
                release_output(out)

    return released


def check_device(device: str) -> str:
    """Refuse a --device that is not auto, cpu or cuda, or cuda without a GPU; return the device to use."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise CompressedExpertsError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressedExpertsError("--device cuda, but PyTorch sees no CUDA device")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


DEVICE_HELP = "auto (CUDA when there is a GPU), cpu or cuda."
DTYPE_HELP = "Weights dtype: auto (as saved), float32, bfloat16, float16."


def settings_options(settings: type) -> list[inspect.Parameter]:
    """One ``--flag`` per field of a settings dataclass: its type, its default and the help text
    written on the field (:func:`compressed_experts.config.setting`). Nothing is restated here."""
    hints = typing.get_type_hints(settings)
    params = []
    for field in dataclasses.fields(settings):
        if field.metadata.get("flag") is False:  # a setting the library sets, not the user
            continue
        spelling = flag(field.name)
        if hints[field.name] is bool:  # --packing / --no-packing, as typer spells a bool it names itself
            spelling += "/--no-" + spelling[2:]
        option = typer.Option(spelling, help=field.metadata.get("help"))
        default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        params.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[hints[field.name], option],
            )
        )
    return params


def with_options(command: Callable[..., None], *groups: list[inspect.Parameter]) -> Callable[..., None]:
    """``command`` (which takes keyword arguments) with the given parameters as its signature:
    typer builds the command's arguments and flags from the signature."""
    command.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for group in groups for p in group]
    )
    return command


def options_of(function: Callable[..., None]) -> list[inspect.Parameter]:
    """The parameters of a function written with typer annotations, to combine with settings options."""
    return list(inspect.signature(function, eval_str=True).parameters.values())


def show_model(summary: dict[str, Any], title: str) -> None:
    """The table of :func:`compressed_experts.describe` (a per-token rule's active parameters only
    when they were measured on text)."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rule = "rule" if summary["n_ce"] == "-" else "n_ce"  # a per-token rule has no one n_ce
    for key in ("family", "moe_blocks", "experts", "top_k", rule, "form", "r"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    if "active" not in summary:
        table.add_row("active parameters", "depend on the text: measure them with info --text")
        console.print(table)
        return
    main = summary["main_experts_per_token"]
    table.add_row("main experts per token", f"{main:.2f} (measured)" if summary["n_ce"] == "-" else f"{main:g}")
    table.add_row("expert-equivalents per token", f"{summary['expert_equivalents']:.2f} of {summary['top_k']}")
    for key in ("total", "active", "active_full_topk"):
        table.add_row(f"{key.replace('_', ' ')} parameters", f"{summary[key]:,}")
    table.add_row("active saving", f"{summary['active_saving']:.1%}")
    table.add_row("parameters added by the form", f"{summary['added']:,}")
    for key in ("embeddings", "attention", "routers", "main_experts", "shared_experts", "compressed_experts", "other"):
        table.add_row(f"  active: {key.replace('_', ' ')}", f"{summary[key]:,}")
    console.print(table)


def check_report_file(report) -> None:
    """Refuse a --report that is a folder, or whose folder does not exist, before a run of many minutes
    (a folder failed only at the end)."""
    if report is None:
        return
    if report.is_dir():
        raise CompressedExpertsError(f"--report {report} is a folder; give a Markdown file (e.g. RESULTS.md)")
    if not report.parent.is_dir():
        raise CompressedExpertsError(f"{report.parent} does not exist: create it or choose another --report")
