"""The ``compressed-experts`` command: a thin layer over the library's public functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from .checkpoint import check_output_dir, from_pretrained, load_tokenizer, save_model, skeleton, tokenizer_if_any
from .config import check_dtype_name
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
    for key in ("family", "moe_blocks", "experts", "top_k", "n_ce", "form", "r", "main_experts_per_token"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("expert-equivalents per token", f"{summary['expert_equivalents']:.2f} of {summary['top_k']}")
    for key in ("total", "active", "active_full_topk"):
        table.add_row(f"{key.replace('_', ' ')} parameters", f"{summary[key]:,}")
    table.add_row("active saving", f"{summary['active_saving']:.1%}")
    table.add_row("parameters added by the form", f"{summary['added']:,}")
    for key in ("embeddings", "attention", "routers", "main_experts", "shared_experts", "compressed_experts", "other"):
        table.add_row(f"  active: {key.replace('_', ' ')}", f"{summary[key]:,}")
    console.print(table)


def check_device(device: str) -> str:
    """Refuse a --device that is not auto, cpu or cuda, or cuda without a GPU; return the device to use."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise CompressedExpertsError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressedExpertsError("--device cuda, but PyTorch sees no CUDA device")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _run(action) -> None:
    """Turn the library's user errors (and file-system errors) into one red line and exit code 2."""
    try:
        action()
    except (CompressedExpertsError, OSError) as err:
        _fail(str(err))


@app.command()
def info(source: SourceArg) -> None:
    """Family, experts, top-k, n_ce, and total and active parameters (reads the config only)."""
    _run(lambda: _show(describe(skeleton(source)), source))


FORM_HELP = ("ia3 (the paper's vectors), none (the top-m baseline), subset (the auxiliary experts' r most "
             "important neurons) or slim (a small trainable MLP of r neurons per expert).")
R_HELP = "Neurons per auxiliary expert for subset and slim; default an eighth of the expert's."


@app.command()
def convert(
    source: SourceArg,
    n_ce: Annotated[int, typer.Option("--n-ce", help="Routed experts per token replaced by compressed experts.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the converted model to.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds files.")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype: auto (as saved), float32, bfloat16, float16.")] = "auto",
    form: Annotated[str, typer.Option(help=FORM_HELP)] = "ia3",
    r: Annotated[Optional[int], typer.Option(help=R_HELP)] = None,
) -> None:
    """Convert an MoE checkpoint to compressed experts and save it (with its tokenizer, if any)."""

    def action() -> None:
        check_output_dir(out, overwrite=overwrite, sources={"source model": source})
        check_dtype_name(dtype, "--dtype")
        with console.status(f"loading {source}"):
            model = from_pretrained(source, n_ce=n_ce, form=form, r=r, dtype=dtype)
        _save_model(model, source, out)
        _show(describe(model), f"{source} -> {out}")

    _run(action)


def _save_model(model, source: str, out: Path, extra: dict[str, str] | None = None, tokenizer=None) -> None:
    """Save the model, its tokenizer (``tokenizer``, else the source's if it has one) and ``extra``
    files into --out in one step (checkpoint.save_model), saying so on the console."""
    if tokenizer is None:
        tokenizer = tokenizer_if_any(source)
        if tokenizer is None:
            console.print(f"[yellow]note:[/] no tokenizer found at {source}; saved the model alone")
    with console.status(f"saving to {out}"):
        save_model(model, out, tokenizer=tokenizer, extra_files=extra)


@app.command()
def fit(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the fitted model to.")],
    n_ce: Annotated[Optional[int], typer.Option("--n-ce", help="Routed experts per token replaced (needed for a plain model).")] = None,
    form: Annotated[Optional[str], typer.Option(help=FORM_HELP + " Default: the checkpoint's, else ia3.")] = None,
    r: Annotated[Optional[int], typer.Option(help=R_HELP)] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration text: a .txt, .json/.jsonl/.parquet file or a dataset name; default the training files of the bundled corpus's held-out part.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    tokens: Annotated[int, typer.Option(help="Calibration tokens in all.")] = 16384,
    steps: Annotated[int, typer.Option(help="Adam steps per MoE block (ia3, slim).")] = 200,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate; default 1e-2 for ia3, 1e-3 for slim.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration text's order and the fitting batches.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weights dtype: auto (as saved), float32 (best for fitting), bfloat16, float16.")] = "float32",
    device: Annotated[str, typer.Option(help="auto (CUDA when there is a GPU), cpu or cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds a model.")] = False,
) -> None:
    """Fit compressed experts to the full top-k blocks on calibration text, with no fine-tuning, and save the model."""
    import json

    from .convert import ce_config_of
    from .fit import calibration_blocks, check_settings
    from .fit import fit as fit_model
    from .toy.tasks import domain_split

    def action() -> None:
        check_output_dir(out, overwrite=overwrite, sources={"source model": source})
        check_dtype_name(dtype, "--dtype")
        check_settings(steps, lr)
        where = check_device(device)
        # Before any text or weight is read: the conversion must make sense for this model (a plain
        # one needs --n-ce; a converted one must match --form/--r; r must fit its experts).
        wanted = ce_config_of(skeleton(source, n_ce=n_ce, form=form, r=r))
        if wanted is None:
            raise CompressedExpertsError(f"{source} has no compressed experts: give --n-ce (and --form) to convert it")
        if wanted.form == "none":
            raise CompressedExpertsError("form none (top-m) has nothing to fit; choose ia3, subset or slim")
        tokenizer = load_tokenizer(source)
        with console.status("reading calibration text"):
            # Without --calib: the training files of the bundled corpus's held-out part (the
            # standard library's test suite; the files the demo scores on are not among them).
            texts = calib if calib is not None else domain_split()[0]
            blocks = calibration_blocks(tokenizer, texts, seq_len=seq_len, tokens=tokens, seed=seed)
        with console.status(f"loading {source}"):
            model = from_pretrained(source, n_ce=n_ce, form=form, r=r, dtype=dtype).to(where)
        report = fit_model(model, blocks, steps=steps, lr=lr, seed=seed)
        report["source"], report["calibration"] = source, calib or "bundled held-out corpus"
        _save_model(model, source, out, {"fit_report.json": json.dumps(report, indent=2)}, tokenizer=tokenizer)
        table = Table(title=f"fitted {source} -> {out}")
        for column in ("block", "tokens", "relative error as converted", "neurons chosen", "fitted", "seconds"):
            table.add_column(column, justify="right")
        for row in report["blocks"]:
            table.add_row(str(row["block"]), f"{row['tokens']:,}", f"{row['relative_error_converted']:.4f}",
                          f"{row['relative_error_before']:.4f}", f"{row['relative_error_after']:.4f}", f"{row['seconds']:.1f}")
        console.print(table)

    _run(action)


def _csv(text: str, allowed: tuple[str, ...] | None = None, kind=str) -> tuple:
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise CompressedExpertsError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from err
    if kind is int and any(v <= 0 for v in values):
        raise CompressedExpertsError(f"token counts must be positive, got {text!r}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise CompressedExpertsError(f"unknown value(s) {', '.join(map(str, bad))}; choose from {', '.join(allowed)}")
    if not values:
        raise CompressedExpertsError("an empty list was given")
    return values


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    shapes: Annotated[str, typer.Option(help="Layer shapes: olmoe, phimoe; 'none' for end to end only.")] = "olmoe,phimoe",
    dtypes: Annotated[str, typer.Option(help="bfloat16, float32.")] = "bfloat16,float32",
    tokens: Annotated[str, typer.Option(help="Token counts per call.")] = "1,16,512",
    modes: Annotated[str, typer.Option(help="forward, forward+backward.")] = "forward,forward+backward",
    repeats: Annotated[int, typer.Option(help="Timed repeats (median reported), after 2 warm-ups.")] = 5,
    end_to_end: Annotated[bool, typer.Option(help="Also time prefill and decode of a 4-layer OLMoE-shape model.")] = True,
    out_dir: Annotated[Path, typer.Option(help="Where <device>.json goes.")] = Path("benchmarks"),
    doc: Annotated[Path, typer.Option(help="Markdown report regenerated from every JSON in --out-dir.")] = Path("BENCHMARKS.md"),
    report_only: Annotated[bool, typer.Option(help="Measure nothing: regenerate --doc from the JSON in --out-dir.")] = False,
) -> None:
    """Time transformers' MoE block, full top-k, top-m and compressed experts side by side."""
    from . import bench as benchmark

    def action() -> None:
        if report_only:
            benchmark.write_report(None, out_dir, doc)
            console.print(f"regenerated {doc} from {out_dir}")
            return
        if repeats < 5:
            raise CompressedExpertsError("--repeats must be at least 5: a median of fewer runs is noise")
        check_device(device)
        # Every argument and output is checked now, not after a run of many minutes.
        layer_shapes = () if shapes == "none" else _csv(shapes, tuple(benchmark.SHAPES))
        settings = (_csv(dtypes, ("bfloat16", "float32")), _csv(tokens, kind=int), _csv(modes, ("forward", "forward+backward")))
        if not layer_shapes and not end_to_end:
            raise CompressedExpertsError("--shapes none with --no-end-to-end measures nothing")
        if not doc.parent.is_dir():
            raise CompressedExpertsError(f"{doc.parent} does not exist: create it or choose another --doc")
        out_dir.mkdir(parents=True, exist_ok=True)
        for target in (out_dir, doc.parent):
            if not os.access(target, os.W_OK):
                raise CompressedExpertsError(f"cannot write to {target}")
        command = "compressed-experts bench " + " ".join(sys.argv[2:])
        with console.status("benchmarking") as status:
            result = benchmark.run(
                device, layer_shapes, *settings, repeats, end_to_end, command,
                progress=lambda text: status.update(f"benchmarking: {text}"),
            )
        benchmark.write_report(result, out_dir, doc)
        console.print(Markdown(benchmark.markdown(result)))
        console.print(f"wrote {out_dir / (result['device'] + '.json')} and {doc}")

    _run(action)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model directory, hub id, or tiny:<family>.")],
    data: Annotated[str, typer.Option(help="Hugging Face dataset name, or a local .json/.jsonl/.parquet file.")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, log, and the final model.")],
    method: Annotated[str, typer.Option(help="full (all top-k experts), top-m (top k - n_ce only) or ce.")] = "ce",
    n_ce: Annotated[Optional[int], typer.Option("--n-ce", help="Experts per token replaced; default the checkpoint's, else half the top-k.")] = None,
    form: Annotated[Optional[str], typer.Option(help="Method ce: ia3 (the paper's vectors), subset or slim; default the checkpoint's, else ia3.")] = None,
    r: Annotated[Optional[int], typer.Option(help=R_HELP)] = None,
    distill_weight: Annotated[float, typer.Option(help="Weight of a term pulling each converted block towards the full top-k block's output.")] = 0.0,
    trainable: Annotated[str, typer.Option(help="all (the paper), ce+router, or ce (the vectors only).")] = "all",
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 2e-5,
    ce_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the compressed experts; default --lr.")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the data (ignored with --max-steps).")] = 2.0,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence; default min(2048, the model's limit).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    warmup: Annotated[float, typer.Option(help="Warm-up, as a fraction of the steps.")] = 0.03,
    seed: Annotated[int, typer.Option(help="Seed of the weights' noise, data order and dropout.")] = 0,
    precision: Annotated[str, typer.Option(help="auto, bf16-mixed, bf16 or fp32.")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in the backward pass.")] = True,
    packing: Annotated[bool, typer.Option(help="Concatenate examples into full-length sequences.")] = True,
    response_only: Annotated[bool, typer.Option(help="Loss on response tokens only.")] = False,
    prompt: Annotated[str, typer.Option(help="alpaca (the paper's template) or chat (the tokenizer's chat template).")] = "alpaca",
    split: Annotated[str, typer.Option(help="Split of a hub dataset.")] = "train",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N records.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer source, if not the model's.")] = None,
    save_steps: Annotated[float, typer.Option(help="Checkpoint every N steps (below 1: a fraction of the run).")] = 0.1,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep checkpoints/ after the run ends.")] = False,
    logging_steps: Annotated[int, typer.Option(help="Log the loss every N steps.")] = 10,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Fine-tune a model with full top-k, top-m or compressed experts (the transformers Trainer;
    runs under accelerate launch or torchrun for many GPUs)."""
    settings = {**locals(), "out": str(out)}  # the options carry TrainConfig's names
    from .training import TrainConfig
    from .training import train as run_training

    def action() -> None:
        result = run_training(TrainConfig(**settings))
        if int(os.environ.get("RANK", "0")) == 0:
            _show_summary(result.summary, out)

    _run(action)


def _show_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"trained -> {out}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("method", "n_ce", "trainable", "steps", "tokens", "precision"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    table.add_row("active parameters per token", f"{summary['active_parameters']:,}")
    table.add_row("  full top-k would be", f"{summary['active_full_topk']:,}")
    table.add_row("trained parameters", f"{summary['trained_parameters']:,}")
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the runs, results JSON, table and plot go.")] = Path("out/demo"),
    quick: Annotated[bool, typer.Option(help="A first look in about 3 minutes (fewer steps and test problems).")] = False,
    seeds: Annotated[int, typer.Option(help="Repeat with this many seeds; the table shows mean and spread.")] = 1,
    math_steps: Annotated[Optional[int], typer.Option(help="Fine-tuning steps on math (default 300, 40 with --quick); 600 "
                                                      "lets the model learn the task, in about twice the time.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write the table into this Markdown file (e.g. RESULTS.md), between its demo markers.")] = None,
) -> None:
    """The paper's experiment on the bundled model: fine-tune full top-8, top-4 and compressed
    experts, evaluate, time, and print the table (about 15 minutes on two CPU cores)."""
    import dataclasses

    from .toy.demo import QUICK, Plan, run_demo, table_markdown, write_report

    def action() -> None:
        if report is not None and not report.parent.is_dir():
            raise CompressedExpertsError(f"{report.parent} does not exist: create it or choose another --report")
        plan = QUICK if quick else Plan()
        if math_steps is not None:
            plan = dataclasses.replace(plan, math_steps=math_steps)
        results = run_demo(out, plan, seeds, say=lambda text: console.print(f"[bold]demo:[/] {text}"))
        console.print(Markdown(table_markdown(results)))
        console.print(f"{results['seconds'] / 60:.1f} min; wrote {out / 'demo_results.json'}, "
                      f"{out / 'demo_table.md'} and {out / 'demo_plot.png'}")
        if report is not None:
            write_report(results, "compressed-experts demo " + " ".join(sys.argv[2:]), report)
            console.print(f"updated {report}")

    _run(action)


# Defined in evaluation/commands.py (they use _run and console from here, imported in their bodies).
from .evaluation.commands import compare_command, eval_command  # noqa: E402

app.command("eval")(eval_command)
app.command("compare")(compare_command)

toy_app = typer.Typer(help="The bundled small MoE: its pretraining recipe and the forms study.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


@toy_app.command("forms")
def toy_forms(
    out: Annotated[Path, typer.Option(help="Where the runs, results JSON, table and Pareto plot go.")] = Path("out/forms"),
    quick: Annotated[bool, typer.Option(help="A first look in a few minutes (little calibration, short sweep).")] = False,
    seeds: Annotated[int, typer.Option(help="Repeat the fits and fine-tunings with this many seeds.")] = 1,
    finetune: Annotated[bool, typer.Option(help="Also fine-tune, with and without distillation.")] = True,
    report: Annotated[Optional[Path], typer.Option(help="Also write the table into this Markdown file (e.g. RESULTS.md), between its forms markers.")] = None,
) -> None:
    """Compressed-expert forms on the bundled model: held-out loss as converted, fitted and fine-tuned,
    the share of the top-4 -> top-8 gap each closes, and a Pareto plot over r and n_ce."""
    from .toy.demo import write_section
    from .toy.forms import BEGIN, END, QUICK_STUDY, StudyPlan, run_study, table_markdown

    def action() -> None:
        if report is not None and not report.parent.is_dir():
            raise CompressedExpertsError(f"{report.parent} does not exist: create it or choose another --report")
        results = run_study(out, QUICK_STUDY if quick else StudyPlan(), seeds, finetune=finetune,
                            say=lambda text: console.print(f"[bold]forms:[/] {text}"))
        console.print(Markdown(table_markdown(results)))
        console.print(f"{results['seconds'] / 60:.1f} min; wrote {out / 'forms_results.json'}, "
                      f"{out / 'forms_table.md'} and {out / 'forms_pareto.png'}")
        if report is not None:
            write_section(report, BEGIN, END, "compressed-experts toy forms " + " ".join(sys.argv[3:]),
                          results["seconds"], table_markdown(results))
            console.print(f"updated {report}")

    _run(action)


@toy_app.command("pretrain")
def toy_pretrain(
    out: Annotated[Path, typer.Option(help="Work directory: corpus, init, run, and the exported model.")] = Path("out/toy-pretrain"),
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (16 x 256 tokens each).")] = 2400,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
    ship: Annotated[bool, typer.Option(help="Also copy the exported model into the package (what the repo ships).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Pretrain the bundled OLMoE-architecture model on the standard library (about 45 min on 2 CPU cores)."""
    from .toy.pretrain import Recipe, pretrain, ship_export

    def action() -> None:
        report = pretrain(out, Recipe(max_steps=max_steps, seed=seed), resume=resume, overwrite=overwrite)
        console.print_json(data=report)
        if ship:
            console.print(f"shipped to {ship_export(out / 'model')}")

    _run(action)
