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
from ..config import check_dtype_name
from ..convert import ce_config_of
from ..errors import CompressedExpertsError
from ..fit import FitConfig, calibration_blocks, fittable_forms
from ..fit import fit as fit_model
from ..forms import REGISTRY
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

FORM_HELP = "; ".join(f"{name}: {form.help}" for name, form in REGISTRY.items()) + "."
R_HELP = (
    "Neurons per auxiliary expert ("
    + ", ".join(n for n, f in REGISTRY.items() if f.takes_r)
    + "); default an eighth of the expert's."
)


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
) -> None:
    """Family, experts, top-k, n_ce, and total and active parameters (reads the config only)."""

    def action() -> None:
        if verify:
            _verify(source)
        show_model(describe(skeleton(source)), source)

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


@app.command()
def convert(
    source: SourceArg,
    n_ce: Annotated[int, typer.Option("--n-ce", help="Routed experts per token replaced by compressed experts.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the converted model to.")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it holds a model written by compressed-experts.")
    ] = False,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    form: Annotated[str, typer.Option(help=FORM_HELP)] = "ia3",
    r: Annotated[int | None, typer.Option(help=R_HELP)] = None,
) -> None:
    """Convert an MoE checkpoint to compressed experts and save it (with its tokenizer, if any)."""

    def action() -> None:
        check_output_dir(out, overwrite=overwrite, sources={"source model": source})
        check_dtype_name(dtype, "dtype")
        with console.status(f"loading {source}"):
            model = from_pretrained(source, n_ce=n_ce, form=form, r=r, dtype=dtype)
        _save(model, source, out)
        show_model(describe(model), f"{source} -> {out}")

    run(releasing(out, action))


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
    n_ce: Annotated[
        int | None, typer.Option("--n-ce", help="Routed experts per token replaced (needed for a plain model).")
    ] = None,
    form: Annotated[str | None, typer.Option(help=FORM_HELP + " Default: the checkpoint's, else ia3.")] = None,
    r: Annotated[int | None, typer.Option(help=R_HELP)] = None,
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
) -> None:
    """The fit command's own options; the fitting settings come from FitConfig."""


def fit(**options) -> None:
    """Fit compressed experts to the full top-k blocks on calibration text, with no fine-tuning, and save the model."""
    fitting = {name: options.pop(name) for name in list(options) if name in FitConfig.__dataclass_fields__}
    source, out, calib = options["source"], options["out"], options["calib"]
    n_ce, form, r = options["n_ce"], options["form"], options["r"]

    def action() -> None:
        check_output_dir(out, overwrite=options["overwrite"], sources={"source model": source})
        check_dtype_name(options["dtype"], "dtype")
        config = FitConfig(**fitting)
        where = check_device(options["device"])
        # Before any text or weight is read: the conversion must make sense for this model (a plain
        # one needs --n-ce; a converted one must match --form/--r; r must fit its experts).
        wanted = ce_config_of(skeleton(source, n_ce=n_ce, form=form, r=r))
        if wanted is None:
            raise CompressedExpertsError(f"{source} has no compressed experts: give --n-ce (and --form) to convert it")
        if wanted.n_ce == 0:  # it failed with a RuntimeError after reading the text and the model
            raise CompressedExpertsError(
                "n_ce 0 replaces no experts, so there is nothing to fit: give n_ce of 1 or more", settings=("n_ce",)
            )
        if wanted.form not in fittable_forms():
            raise CompressedExpertsError(
                f"form {wanted.form} has nothing to fit; choose one of {', '.join(fittable_forms())}"
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
            model = from_pretrained(source, n_ce=n_ce, form=form, r=r, dtype=options["dtype"]).to(where)
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


app.command("fit")(with_options(fit, options_of(_fit_options), settings_options(FitConfig)))
