"""``plan``: each MoE block's compressed-experts setting chosen on calibration text under a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..checkpoint import from_pretrained, load_tokenizer, skeleton
from ..config import CEConfig, check_dtype_name
from ..fit import calibration_blocks
from ..plan import PlanConfig, frontier_plot
from ..plan import plan as plan_model
from ..toy.tasks import domain_split
from .app import app
from .bench import csv_values
from .common import (
    DEVICE_HELP,
    DTYPE_HELP,
    SourceArg,
    check_device,
    check_report_file,
    console,
    options_of,
    run,
    settings_options,
    with_options,
)

#: Held-out tokens scored per model at each frontier point (two models a point): cheap beside the plan itself.
HELDOUT_TOKENS = 4096


def _plan_options(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Where plan.json goes.")] = Path("plan.json"),
    plot: Annotated[Path | None, typer.Option(help="Frontier plot (PNG); default next to --out, <out>.png.")] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration text: a .txt, .json/.jsonl/.parquet file or a dataset name; default the training "
            "files of the bundled corpus's held-out part."
        ),
    ] = None,
    heldout: Annotated[
        str | None,
        typer.Option(
            help="Held-out text for the frontier's loss (same kinds as --calib; up to 4,096 tokens of it, or --tokens "
            "if fewer); default the bundled corpus's held-out files when --calib is left out, else none."
        ),
    ] = None,
    frontier: Annotated[
        str,
        typer.Option(
            help="Other budgets (expert-equivalents) planned and measured for the plot, comma-separated; "
            "default every whole number of experts from 1 to k - 1."
        ),
    ] = "",
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    tokens: Annotated[int, typer.Option(help="Calibration tokens in all.")] = 8192,
    seed: Annotated[int, typer.Option(help="Seed of the calibration text's order.")] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """The plan command's own options; what the planner may choose comes from PlanConfig."""


def plan(**options) -> None:
    """Choose each MoE block's setting (n_ce, form, r) under a budget of expert-equivalents per token.

    Measures each block's candidates on calibration text (the model's divergence from full
    top-k with that block alone changed), allocates the budget across blocks, then measures the
    planned model whole beside the best uniform setting. Writes plan.json and a frontier plot.
    """
    settings = {name: options.pop(name) for name in list(options) if name in PlanConfig.__dataclass_fields__}
    source, out = options["source"], options["out"]
    plot = options["plot"] or out.with_suffix(".png")

    def action() -> None:
        config = PlanConfig(**settings)
        check_dtype_name(options["dtype"], "dtype")
        where = check_device(options["device"])
        for path in (out, plot):
            check_report_file(path)
        skeleton(source)  # the model's family and config are checked before any text is read
        budgets = csv_values(options["frontier"], kind=float) if options["frontier"].strip() else None
        tokenizer = load_tokenizer(source)
        with console.status("reading calibration text"):
            calibration, held = options["calib"], options["heldout"]
            if calibration is None:  # the bundled corpus: its training files calibrate, its held-out ones score
                calibration, bundled_held = domain_split()
                held = bundled_held if held is None else held
            blocks = calibration_blocks(
                tokenizer, calibration, seq_len=options["seq_len"], tokens=options["tokens"], seed=options["seed"]
            )
            held_blocks = (
                None
                if held is None
                else calibration_blocks(
                    tokenizer, held, seq_len=options["seq_len"], tokens=min(options["tokens"], HELDOUT_TOKENS)
                )
            )
        with console.status(f"loading {source}"):
            model = from_pretrained(source, dtype=options["dtype"]).to(where)
        result = plan_model(model, blocks, config, frontier=budgets, heldout=held_blocks, progress=True)
        result.save(out)
        frontier_plot(result, plot)
        _show(result, source)
        console.print(f"wrote {out} and {plot}")

    run(action)


def _show(result, source: str) -> None:
    table = Table(title=f"plan for {source}: {result.expert_equivalents:.2f} of {result.top_k} expert-equivalents")
    for column in ("block", "rule", "form", "r", "expert-equivalents", "divergence alone"):
        table.add_column(column, justify="right")
    for block, config, cost, div in zip(result.blocks, result.layers, result.layer_costs, result.layer_divergences):
        table.add_row(block, config.rule, config.form, str(config.r or "-"), f"{cost:.2f}", f"{div:.4f}")
    console.print(table)
    uniform = result.uniform
    line = f"measured KL from full top-k: planned {result.measured_divergence:.4f}"
    if uniform is not None:
        best = CEConfig.from_dict(uniform["setting"])
        line += (
            f"; best uniform setting within the budget ({best.rule}, {best.form}"
            f"{', r ' + str(best.r) if best.r else ''}, {uniform['expert_equivalents']:.2f}): "
            f"{uniform['measured_divergence']:.4f}"
        )
    console.print(line)


app.command("plan")(with_options(plan, options_of(_plan_options), settings_options(PlanConfig)))
