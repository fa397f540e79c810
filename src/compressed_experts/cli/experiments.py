"""``demo``, ``toy forms``, ``toy methods`` and ``toy pretrain``: the experiments and the recipe on the bundled model."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from ..checkpoint import check_output_dir, write_marker
from ..errors import CompressedExpertsError
from ..sources import BUNDLED
from ..toy.demo import QUICK, Plan, run_demo, table_markdown, write_report, write_section
from ..toy.forms import BEGIN, END, QUICK_STUDY, StudyPlan, run_study
from ..toy.forms import table_markdown as forms_table
from ..toy.methods import BEGIN as METHODS_BEGIN
from ..toy.methods import END as METHODS_END
from ..toy.methods import QUICK_METHODS, MethodsPlan, check_study, render, run_methods, saved_rows
from ..toy.methods import table_markdown as methods_table
from ..toy.pretrain import Recipe, pretrain, ship_export
from .app import app, toy_app
from .bench import csv_values
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
        _run_study(
            out,
            overwrite,
            report,
            "forms",
            lambda: run_study(
                out,
                QUICK_STUDY if quick else StudyPlan(),
                seeds,
                finetune=finetune,
                say=lambda text: console.print(f"[bold]forms:[/] {text}"),
            ),
            forms_table,
            ("forms_results.json", "forms_table.md", "forms_pareto.png"),
            (BEGIN, END),
        )

    run(releasing(out, action))


def _run_study(
    out: Path,
    overwrite: bool,
    report: Path | None,
    name: str,
    produce,
    table,
    files,
    markers,
    fresh: bool = True,
    resume: bool | None = None,
) -> None:
    """What the toy studies share around their run: the library's output policy (a new or empty
    --out, or with --overwrite an earlier study's; with ``resume`` the study in --out, continued
    under its lock; neither when ``fresh`` is off and the study renders what is in --out), the
    table printed, and --report's section. ``resume`` is None for a study that cannot resume."""
    if resume and overwrite:
        raise CompressedExpertsError(
            "give --resume (continue the study in --out) or --overwrite (replace it), not both"
        )
    if resume:
        check_output_dir(out, sources={"model": BUNDLED}, keep=True)
    elif fresh:
        replaces = f"a {name} study directory"
        if check_output_dir(
            out, overwrite=overwrite, sources={"model": BUNDLED}, replaces=replaces, resumable=resume is not None
        ):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, f"{name} study")
    results = produce()
    console.print(Markdown(table(results)))
    console.print(f"{results['seconds'] / 60:.1f} min; wrote {', '.join(str(out / f) for f in files)}")
    if report is not None:
        command = f"compressed-experts toy {name} " + " ".join(sys.argv[3:])
        write_section(report, *markers, command, results["seconds"], table(results))
        console.print(f"updated {report}")


@toy_app.command("methods")
def toy_methods(
    out: Annotated[Path, typer.Option(help="Where the models, results JSON, table and plots go.")] = Path(
        "out/methods"
    ),
    quick: Annotated[
        bool, typer.Option(help="A first look in about 3 minutes (budgets 2 and 4, little calibration, 3 steps).")
    ] = False,
    seeds: Annotated[
        int, typer.Option(help="Repeat with this many seeds (calibration draw, fitting batches, fine-tuning).")
    ] = 3,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="Expert-equivalents per token and block, whole numbers from 1 to top-k, comma-separated; "
            f"default {','.join(map(str, MethodsPlan.budgets))} ({','.join(map(str, QUICK_METHODS.budgets))} with --quick)."
        ),
    ] = None,
    finetune_budgets: Annotated[
        str | None,
        typer.Option(
            help="Budgets at which every method but pruning is also fine-tuned (the demo's domain recipe), "
            "comma-separated; "
            f"default {','.join(map(str, MethodsPlan.finetune_budgets))}."
        ),
    ] = None,
    finetune_keeps: Annotated[
        str | None,
        typer.Option(
            help="Experts kept per block whose pruned models (plain and with slim stand-ins) are also fine-tuned, "
            f"comma-separated, among {','.join(map(str, MethodsPlan.keeps))}; default "
            f"{','.join(map(str, MethodsPlan.finetune_keeps))} ({','.join(map(str, QUICK_METHODS.finetune_keeps))} "
            "with --quick)."
        ),
    ] = None,
    finetune: Annotated[bool, typer.Option(help="Run the fine-tuned stage.")] = True,
    math: Annotated[
        bool,
        typer.Option(
            help="Run the math stage: at the fine-tuned budgets, the best method of each family ("
            + ", ".join(MethodsPlan.math_methods)
            + ") and the references fine-tuned on the demo's math task, scored by exact match (about 8 minutes a "
            "run here: 5 runs a seed by default)."
        ),
    ] = True,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Also write the table into this Markdown file (e.g. RESULTS.md), between its methods markers."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier study.")] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            help="Measure nothing: write the results, table, plots (and --report) from the rows a run in --out saved "
            "as it went (one that was interrupted, too)."
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted study in --out: keep the rows it saved, measure the rest (same settings; "
            "more --seeds add seeds)."
        ),
    ] = False,
) -> None:
    """Every method at matched budgets on the bundled model: top-m, the fitted forms, top-p and
    skipping, the planner and pruning; held-out loss, gap closed, and two Pareto plots."""

    def action() -> None:
        check_report_file(report)
        settings = QUICK_METHODS if quick else MethodsPlan()
        if budgets is not None:  # the default fine-tuned budgets that remain among the budgets given
            chosen = csv_values(budgets, kind=float)
            kept = tuple(b for b in settings.finetune_budgets if b in chosen)
            settings = dataclasses.replace(settings, budgets=chosen, finetune_budgets=kept)
        if finetune_budgets is not None:
            settings = dataclasses.replace(settings, finetune_budgets=csv_values(finetune_budgets, kind=float))
        if finetune_keeps is not None:
            settings = dataclasses.replace(settings, finetune_keeps=csv_values(finetune_keeps, kind=float))
        if report_only and resume:
            raise CompressedExpertsError(
                "give --report-only (measure nothing) or --resume (measure the rest), not both"
            )
        if not report_only:
            check_study(settings, seeds, BUNDLED)
        _run_study(
            out,
            overwrite,
            report,
            "methods",
            (lambda: render(out, saved_rows(out)))
            if report_only
            else lambda: run_methods(
                out,
                settings,
                seeds,
                finetune=finetune,
                say=lambda text: console.print(f"[bold]methods:[/] {text}"),
                resume=resume,
                math=math,
            ),
            methods_table,
            ("methods_results.json", "methods_table.md", "methods_pareto_active.png", "methods_pareto_memory.png"),
            (METHODS_BEGIN, METHODS_END),
            fresh=not report_only,
            resume=resume,
        )

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
