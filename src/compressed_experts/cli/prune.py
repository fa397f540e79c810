"""``prune``: remove each MoE block's least-used experts for a domain and save the smaller model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..checkpoint import check_output_dir, from_pretrained, load_tokenizer, save_model, skeleton
from ..config import check_dtype_name
from ..errors import CompressedExpertsError
from ..fit import calibration_blocks
from ..parameters import describe
from ..prune import CRITERIA, PruneConfig, check_calibration, check_prunable, check_stand_in, min_calibration_tokens
from ..prune import prune as prune_model
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


def _prune_options(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the pruned model to.")],
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration text of the domain: a .txt, .json/.jsonl/.parquet file or a dataset name; "
            "default the training files of the bundled corpus's held-out part."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    tokens: Annotated[int, typer.Option(help="Calibration tokens in all.")] = 16384,
    seed: Annotated[int, typer.Option(help="Seed of the calibration text's order.")] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out if it holds a model written by compressed-experts.")
    ] = False,
) -> None:
    """The prune command's own options; the pruning settings come from PruneConfig."""


def prune(**options) -> None:
    """Remove the experts the calibration text uses least from every MoE block and save the smaller model.

    The result is a plain MoE of the same family with --keep experts per block (transformers
    loads it natively); convert and fit it like any other model. With --stand-in ia3 or slim the
    removed experts leave compressed experts behind, fitted on the same text, for the tokens the
    router still sends to them (fitted in float32 and saved in the source's dtype, unless --dtype says
    otherwise); that model loads with compressed_experts.from_pretrained.
    """
    settings = {name: options.pop(name) for name in list(options) if name in PruneConfig.__dataclass_fields__}
    source, out, calib = options["source"], options["out"], options["calib"]

    def action() -> None:
        check_output_dir(out, overwrite=options["overwrite"], sources={"source model": source})
        check_dtype_name(options["dtype"], "dtype")
        config = PruneConfig(**settings)
        where = check_device(options["device"])
        # Before any text or weight is read: the family, --keep and --tokens must make sense.
        shape = skeleton(source)
        experts, top_k = check_prunable(shape, config.keep)
        check_stand_in(shape, config)
        least = min_calibration_tokens(experts, top_k)
        if options["tokens"] < least:
            raise CompressedExpertsError(
                f"--tokens {options['tokens']} is too few to rank {experts} experts at top-{top_k}: give at least {least}"
            )
        tokenizer = load_tokenizer(source)
        with console.status("reading calibration text"):
            texts = calib if calib is not None else domain_split()[0]
            blocks = calibration_blocks(
                tokenizer, texts, seq_len=options["seq_len"], tokens=options["tokens"], seed=options["seed"]
            )
        check_calibration(blocks, experts, top_k)  # text shorter than asked for: refused before loading
        # Stand-ins are fitted: in float32 by default, as the fit command does (Adam steps on 16-bit vectors round
        # away), then saved in the source's own dtype, so that pruning never makes a bfloat16 model larger.
        # The source's dtype is the one transformers loads it in ("auto": its config's, else its weights').
        fitted_apart = config.stand_in is not None and options["dtype"] == "auto"
        with console.status(f"loading {source}"):
            model = from_pretrained(source, dtype=options["dtype"]).to(where)
        saved_dtype = next(model.parameters()).dtype
        if fitted_apart:
            model.float()
        report = prune_model(model, blocks, config, progress=True)
        model.to(saved_dtype)
        report["source"], report["calibration"] = source, calib or "bundled held-out corpus"
        with console.status(f"saving to {out}"):
            save_model(model, out, tokenizer=tokenizer, extra_files={"prune_report.json": json.dumps(report, indent=2)})
        stand_ins = f", {config.stand_in} stand-ins for the rest" if config.stand_in else ""
        table = Table(
            title=f"pruned {source} -> {out}: {experts} -> {config.keep} experts by {config.criterion}{stand_ins}"
        )
        measured = [c for c in CRITERIA if f"{c}_kept" in report["blocks"][0]]
        for column in ("block", *(f"{c} kept" for c in measured)):
            table.add_column(column, justify="right")
        for row in report["blocks"]:
            table.add_row(row["block"], *(f"{row[f'{c}_kept']:.1%}" for c in measured))
        console.print(table)
        # Stand-ins make the number of full experts per token depend on the text: measured on the calibration text.
        show_model(describe(model, blocks if config.stand_in else None), str(out))

    run(releasing(out, action))


app.command("prune")(with_options(prune, options_of(_prune_options), settings_options(PruneConfig)))
