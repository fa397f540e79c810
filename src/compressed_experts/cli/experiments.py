"""``demo``, ``toy forms`` and ``toy pretrain``: the experiments and the recipe on the bundled model."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from ..checkpoint import check_output_dir, write_marker
from ..sources import BUNDLED
from ..toy.demo import QUICK, Plan, run_demo, table_markdown, write_report, write_section
from ..toy.forms import BEGIN, END, QUICK_STUDY, StudyPlan, run_study
from ..toy.forms import table_markdown as forms_table
from ..toy.pretrain import Recipe, pretrain, ship_export
from .app import app, toy_app
from .common import check_report_file, console, releasing, run


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the runs, results JSON, table and plot go.")] = Path("out/demo"),
    quick: Annotated[
        bool, typer.Option(help="A first look in about 3 minutes (fewer steps and test problems).")
    ] = False,
    seeds: Annotated[int, typer.Option(help="Repeat with this many seeds; the table shows mean and spread.")] = 1,
    math_steps: Annotated[
        int | None,
        typer.Option(
            help=f"Fine-tuning steps on math (default {Plan.math_steps}, "
            f"{QUICK.math_steps} with --quick); 600 lets the model learn the task, "
            "in about twice the time."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Also write the table into this Markdown file (e.g. RESULTS.md), between its demo markers."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier demo.")] = False,
) -> None:
    """The paper's experiment on the bundled model: fine-tune full top-8, top-4 and compressed
    experts, evaluate, time, and print the table (about 15 minutes on two CPU cores)."""

    def action() -> None:
        check_report_file(report)
        plan = QUICK if quick else Plan()
        if math_steps is not None:
            plan = dataclasses.replace(plan, math_steps=math_steps)
        results = run_demo(
            out, plan, seeds, say=lambda text: console.print(f"[bold]demo:[/] {text}"), overwrite=overwrite
        )
        console.print(Markdown(table_markdown(results)))
        console.print(
            f"{results['seconds'] / 60:.1f} min; wrote {out / 'demo_results.json'}, "
            f"{out / 'demo_table.md'} and {out / 'demo_plot.png'}"
        )
        if report is not None:
            write_report(results, "compressed-experts demo " + " ".join(sys.argv[2:]), report)
            console.print(f"updated {report}")

    run(action)


@toy_app.command("forms")
def toy_forms(
    out: Annotated[Path, typer.Option(help="Where the runs, results JSON, table and Pareto plot go.")] = Path(
        "out/forms"
    ),
    quick: Annotated[
        bool, typer.Option(help="A first look in a few minutes (little calibration, short sweep).")
    ] = False,
    seeds: Annotated[int, typer.Option(help="Repeat the fits and fine-tunings with this many seeds.")] = 1,
    finetune: Annotated[bool, typer.Option(help="Also fine-tune, with and without distillation.")] = True,
    report: Annotated[
        Path | None,
        typer.Option(help="Also write the table into this Markdown file (e.g. RESULTS.md), between its forms markers."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier study.")] = False,
) -> None:
    """Compressed-expert forms on the bundled model: held-out loss as converted, fitted and fine-tuned,
    the share of the top-4 -> top-8 gap each closes, and a Pareto plot over r and n_ce."""

    def action() -> None:
        check_report_file(report)
        # The library's output policy: a new or empty --out, or with --overwrite an earlier study's.
        if check_output_dir(out, overwrite=overwrite, sources={"model": BUNDLED}, replaces="a forms study directory"):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "forms study")
        results = run_study(
            out,
            QUICK_STUDY if quick else StudyPlan(),
            seeds,
            finetune=finetune,
            say=lambda text: console.print(f"[bold]forms:[/] {text}"),
        )
        console.print(Markdown(forms_table(results)))
        console.print(
            f"{results['seconds'] / 60:.1f} min; wrote {out / 'forms_results.json'}, "
            f"{out / 'forms_table.md'} and {out / 'forms_pareto.png'}"
        )
        if report is not None:
            write_section(
                report,
                BEGIN,
                END,
                "compressed-experts toy forms " + " ".join(sys.argv[3:]),
                results["seconds"],
                forms_table(results),
            )
            console.print(f"updated {report}")

    run(releasing(out, action))


@toy_app.command("pretrain")
def toy_pretrain(
    out: Annotated[Path, typer.Option(help="Work directory: corpus, init, run, and the exported model.")] = Path(
        "out/toy-pretrain"
    ),
    max_steps: Annotated[
        int, typer.Option(help=f"Optimizer steps ({Recipe.batch_size} x {Recipe.seq_len} tokens each).")
    ] = Recipe.max_steps,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = Recipe.seed,
    ship: Annotated[
        bool, typer.Option(help="Also copy the exported model into the package (what the repo ships).")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Pretrain the bundled OLMoE-architecture model on the standard library (about 45 min on 2 CPU cores)."""

    def action() -> None:
        report = pretrain(out, Recipe(max_steps=max_steps, seed=seed), resume=resume, overwrite=overwrite)
        console.print_json(data=report)
        if ship:
            console.print(f"shipped to {ship_export(out / 'model')}")

    run(action)
