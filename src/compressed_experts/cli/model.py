"""``info``, ``convert`` and ``fit``: a model's structure, its conversion, and fitting without fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..checkpoint import (
    check_output_dir,
    from_pretrained,
    load_tokenizer,
    save_model,
    skeleton,
    tokenizer_if_any,
    verify_checkpoint,
)
from ..config import CEConfig, check_dtype_name
from ..convert import ce_config_of
from ..errors import CompressedExpertsError
from ..fit import FitConfig, calibration_blocks, fittable_forms
from ..fit import fit as fit_model
from ..layer import pruned_error
from ..parameters import describe
from ..sources import local_dir, resolve
from ..toy.tasks import domain_split
from .app import app
from .common import (
    DEVICE_HELP,
    DTYPE_HELP,
    SourceArg,
    check_device,
    console,
    options_of,
    releasing,
    run,
    settings_options,
    show_model,
    with_options,
)

#: --n-ce, --form, --r, --top-p and --skip-below, made from CEConfig's fields.
CE_OPTIONS = settings_options(CEConfig)
CE_SETTINGS = tuple(p.name for p in CE_OPTIONS)


def _ce_settings(options: dict) -> dict:
    """The compressed-experts settings among a command's options, taken out of them."""
    return {name: options.pop(name) for name in CE_SETTINGS}


@app.command()
def info(
    source: SourceArg,
    verify: Annotated[
        bool,
        typer.Option(
            help="Also check every file against the checksum manifest written when the model was saved, "
            "and every weight for NaN and inf (reads all the weights)."
        ),
    ] = False,
    text: Annotated[
        str | None,
        typer.Option(
            help="For a model with a per-token rule (top_p, skip_below): text to measure its main experts per "
            "token, and so its active parameters, on: a .txt, .json/.jsonl/.parquet file or a dataset name "
            "(reads the weights)."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens of --text to measure on.")] = 4096,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence of --text.")] = 256,
) -> None:
    """Family, experts, top-k, the rule (n_ce, top_p or skip_below), and total and active parameters
    (reads the config only, unless --text or --verify)."""

    def action() -> None:
        if verify:
            _verify(source)
        shape = skeleton(source)
        config = ce_config_of(shape)
        blocks = config if isinstance(config, tuple) else () if config is None else (config,)
        if text is None or not any(c.dynamic for c in blocks):  # a fixed rule's count needs no text
            show_model(describe(shape), source)
            return
        ids = calibration_blocks(load_tokenizer(source), text, seq_len=seq_len, tokens=tokens)
        with console.status(f"measuring the main experts of {source} on {ids.numel():,} tokens"):
            summary = describe(from_pretrained(source), input_ids=ids)
        show_model(summary, f"{source}, measured on {text}")

    run(action)


def _verify(source: str) -> None:
    """``info --verify``: the whole checksum manifest, hashed; refused where there is none."""
    directory = local_dir(resolve(source))
    if directory is None:
        raise CompressedExpertsError(f"--verify checks a model directory on this machine; {source} is not one")
    with console.status(f"verifying {source}"):
        report = verify_checkpoint(directory, full=True)
    if not report["manifest"]:
        raise CompressedExpertsError(
            f"{source} has no checksum manifest (compressed_experts_manifest.json): it was not saved by "
            f"compressed-experts, so there is nothing to verify it against"
        )
    console.print(
        f"verified: {report['files']} files, {report['bytes']:,} bytes match the checksums they were saved with; "
        f"no NaN or inf in the weights"
    )


#: --form defaults to the checkpoint's (fit) or ia3 (convert): a converted one keeps its form unless told,
#: and a --plan sets every block's.
_FORM_UNSET = [
    p.replace(
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--form",
                help=CEConfig.__dataclass_fields__["form"].metadata["help"] + " Default: the checkpoint's, else ia3.",
            ),
        ],
    )
    if p.name == "form"
    else p
    for p in CE_OPTIONS
]


#: --plan of convert and fit.
PlanOption = Annotated[
    Path | None,
    typer.Option(
        help="A plan.json from compressed-experts plan: each MoE block's own settings, instead of a rule, --form and --r."
    ),
]


def _convert_options(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the converted model to.")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it holds a model written by compressed-experts.")
    ] = False,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    plan: PlanOption = None,
) -> None:
    """The convert command's own options; the conversion's come from CEConfig."""


def convert(**options) -> None:
    """Convert an MoE checkpoint to compressed experts and save it (with its tokenizer, if any).
    Give one rule: --n-ce, or a per-token --top-p or --skip-below; or a --plan from compressed-experts plan."""
    settings = {name: value for name, value in _ce_settings(options).items() if value is not None}
    source, out, dtype, plan = options["source"], options["out"], options["dtype"], options["plan"]

    def action() -> None:
        if plan is None:
            CEConfig(**settings)  # before anything is written or read: one rule, in range
        check_output_dir(out, overwrite=options["overwrite"], sources={"source model": source})
        check_dtype_name(dtype, "dtype")
        with console.status(f"loading {source}"):
            model = from_pretrained(source, **settings, plan=plan, dtype=dtype)
        _save(model, source, out)
        show_model(describe(model), f"{source} -> {out}")

    run(releasing(out, action))


app.command("convert")(with_options(convert, options_of(_convert_options), _FORM_UNSET))


def _save(model, source: str, out: Path, extra: dict[str, str] | None = None, tokenizer=None) -> None:
    """Save the model, its tokenizer (``tokenizer``, else the source's if it has one) and ``extra``
    files into --out in one step (:func:`compressed_experts.checkpoint.save_model`), saying so."""
    if tokenizer is None:
        tokenizer = tokenizer_if_any(source)
        if tokenizer is None:
            console.print(f"[yellow]note:[/] no tokenizer found at {source}; saved the model alone")
    with console.status(f"saving to {out}"):
        save_model(model, out, tokenizer=tokenizer, extra_files=extra)


def _fit_options(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the fitted model to.")],
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration text: a .txt, .json/.jsonl/.parquet file or a dataset name; default the training files of the bundled corpus's held-out part."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    tokens: Annotated[int, typer.Option(help="Calibration tokens in all.")] = 16384,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP + " float32 fits best.")] = "float32",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it holds a model written by compressed-experts.")
    ] = False,
    plan: PlanOption = None,
) -> None:
    """The fit command's own options; the fitting settings come from FitConfig, the conversion's from
    CEConfig (all optional: a converted checkpoint keeps its own)."""


def fit(**options) -> None:
    """Fit compressed experts to the full top-k blocks on calibration text, with no fine-tuning, and save the model.
    A plain model needs a rule: --n-ce, or a per-token --top-p or --skip-below; or a --plan from compressed-experts plan."""
    fitting = {name: options.pop(name) for name in list(options) if name in FitConfig.__dataclass_fields__}
    settings = _ce_settings(options)
    if options["plan"] is not None:  # the plan sets each block's; from_pretrained refuses any given beside it
        settings = {name: value for name, value in settings.items() if value is not None} | {"plan": options["plan"]}
    source, out, calib = options["source"], options["out"], options["calib"]

    def action() -> None:
        check_output_dir(out, overwrite=options["overwrite"], sources={"source model": source})
        check_dtype_name(options["dtype"], "dtype")
        config = FitConfig(**fitting)
        where = check_device(options["device"])
        # Before any text or weight is read: the conversion must make sense for this model (a plain
        # one needs --n-ce; a converted one must match --form/--r; r must fit its experts).
        wanted = ce_config_of(skeleton(source, **settings))
        if wanted is None:
            raise CompressedExpertsError(
                f"{source} has no compressed experts: give --n-ce, --top-p or --skip-below (and --form), or a "
                f"--plan, to convert it"
            )
        blocks = wanted if isinstance(wanted, tuple) else (wanted,)
        pruned = [c for c in blocks if c.kept_experts is not None]  # a saved one holds its kept experts only
        if pruned:
            raise pruned_error(pruned[0])
        if all(c.n_ce == 0 for c in blocks):  # it failed with a RuntimeError after reading the text and the model
            raise CompressedExpertsError(
                "n_ce 0 replaces no experts, so there is nothing to fit: give n_ce of 1 or more", settings=("n_ce",)
            )
        if not any(c.form in fittable_forms() and c.n_ce != 0 for c in blocks):
            forms = ", ".join(sorted({c.form for c in blocks}))
            raise CompressedExpertsError(
                f"form {forms} has nothing to fit; choose one of {', '.join(fittable_forms())}"
            )
        tokenizer = load_tokenizer(source)
        with console.status("reading calibration text"):
            # Without --calib: the training files of the bundled corpus's held-out part (the
            # standard library's test suite; the files the demo scores on are not among them).
            texts = calib if calib is not None else domain_split()[0]
            blocks = calibration_blocks(
                tokenizer, texts, seq_len=options["seq_len"], tokens=options["tokens"], seed=config.seed
            )
        with console.status(f"loading {source}"):
            model = from_pretrained(source, **settings, dtype=options["dtype"]).to(where)
        report = fit_model(model, blocks, config)
        report["source"], report["calibration"] = source, calib or "bundled held-out corpus"
        _save(model, source, out, {"fit_report.json": json.dumps(report, indent=2)}, tokenizer=tokenizer)
        table = Table(title=f"fitted {source} -> {out}")
        for column in ("block", "tokens", "relative error as converted", "neurons chosen", "fitted", "seconds"):
            table.add_column(column, justify="right")
        for row in report["blocks"]:
            table.add_row(
                str(row["block"]),
                f"{row['tokens']:,}",
                f"{row['relative_error_converted']:.4f}",
                f"{row['relative_error_before']:.4f}",
                f"{row['relative_error_after']:.4f}",
                f"{row['seconds']:.1f}",
            )
        console.print(table)

    run(releasing(out, action))


app.command("fit")(with_options(fit, options_of(_fit_options), _FORM_UNSET, settings_options(FitConfig)))
