"""``bench``: transformers' MoE block, full top-k, top-m and compressed experts timed side by side."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from .. import bench as benchmark
from ..config import CEConfig
from ..errors import CompressedExpertsError
from ..models_bench import NEW_TOKENS, PROMPT
from .app import app
from .common import DEVICE_HELP, check_device, console, run


def csv_values(text: str, allowed: tuple[str, ...] | None = None, kind=str) -> tuple:
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise CompressedExpertsError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from err
    if kind is int and any(v <= 0 for v in values):
        raise CompressedExpertsError(f"token counts must be positive, got {text!r}")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise CompressedExpertsError(
                f"unknown value(s) {', '.join(map(str, bad))}; choose from {', '.join(allowed)}"
            )
    if not values:
        raise CompressedExpertsError("an empty list was given")
    return values


@app.command()
def bench(
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    shapes: Annotated[
        str, typer.Option(help="Layer shapes: olmoe, phimoe; 'none' for end to end only.")
    ] = "olmoe,phimoe",
    dtypes: Annotated[str, typer.Option(help="bfloat16, float32.")] = "bfloat16,float32",
    tokens: Annotated[str, typer.Option(help="Token counts per call.")] = "1,16,512",
    modes: Annotated[str, typer.Option(help="forward, forward+backward.")] = "forward,forward+backward",
    repeats: Annotated[int, typer.Option(help="Timed repeats (median reported), after 2 warm-ups.")] = 5,
    end_to_end: Annotated[
        bool, typer.Option(help="Also time prefill and decode of a 4-layer OLMoE-shape model.")
    ] = True,
    compiled_decode: Annotated[
        bool | None,
        typer.Option(
            "--compiled-decode/--no-compiled-decode",
            help="End to end: also time decode in its fastest mode, a static cache and torch.compile "
            "(mode reduce-overhead: CUDA graphs), for every model. Default: on for CUDA, off for the CPU.",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[Path, typer.Option(help="Where <device>.json goes.")] = Path("benchmarks"),
    doc: Annotated[Path, typer.Option(help="Markdown report regenerated from every JSON in --out-dir.")] = Path(
        "BENCHMARKS.md"
    ),
    report_only: Annotated[
        bool, typer.Option(help="Measure nothing: regenerate --doc from the JSON in --out-dir.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue an interrupted run: keep the rows it saved in --out-dir/<device>.json.partial "
            "(same machine and --repeats) and measure only the rest."
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="layers: the library's blocks as above; vllm: output tokens/s of whole models served by vLLM "
            "(--model, --requests, --new-tokens; writes --out-dir/vllm-<device>.json), or of saved models "
            "compared (--model A,B,..., --text; writes --out-dir/vllm-<device>-<models>.json); transformers: "
            "whole saved models side by side, memory and prefill/decode speed (--model A,B,..., --requests as "
            "batch sizes, --new-tokens, --text; writes --out-dir/models-<device>-<models>.json)."
        ),
    ] = "layers",
    model: Annotated[
        str,
        typer.Option(
            help="--engine vllm: the model whose three variants (five with a rule) are served, or several to "
            "compare; --engine transformers or vllm: the models to compare, comma-separated, the reference first "
            "(e.g. bundled,out/pruned)."
        ),
    ] = "bundled",
    requests: Annotated[
        str | None,
        typer.Option(
            help="--engine vllm: concurrent requests (default 1,8,64); --engine transformers: batch sizes "
            "(default 1,8)."
        ),
    ] = None,
    new_tokens: Annotated[
        int | None,
        typer.Option(help="--engine vllm/transformers: tokens generated per request (default 64 / 32)."),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option(help="Comparing saved models: tokens per prompt, cut from --text.")
    ] = PROMPT,
    text: Annotated[
        str | None,
        typer.Option(
            help="Comparing saved models: text the prompts are cut from (a .txt, .json/.jsonl/.parquet file or "
            "dataset name, as fit's --calib). Default: the bundled corpus's held-out files."
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="--engine vllm: also time top-m and compressed experts under this per-token top_p rule."),
    ] = None,
    skip_below: Annotated[
        float | None,
        typer.Option(
            help="--engine vllm: also time top-m and compressed experts under this per-token skip_below rule."
        ),
    ] = None,
) -> None:
    """Time transformers' MoE block, full top-k, top-m and compressed experts side by side."""

    def action() -> None:
        if engine not in ("layers", "vllm", "transformers"):
            raise CompressedExpertsError(f"--engine must be layers, vllm or transformers, not {engine!r}")
        if report_only and engine != "layers":
            raise CompressedExpertsError("--report-only regenerates the layer report: leave out --engine")
        sources = csv_values(model)
        comparing = engine == "transformers" or (engine == "vllm" and len(sources) > 1)
        if not comparing and (text is not None or prompt_tokens != PROMPT):
            raise CompressedExpertsError(
                "--text and --prompt-tokens are for comparing saved models (--engine transformers or vllm, "
                "--model A,B,...): the prompts"
            )
        counts = csv_values(requests or ("1,8" if engine == "transformers" else "1,8,64"), kind=int)
        generated = new_tokens if new_tokens is not None else (NEW_TOKENS if engine == "transformers" else 64)
        rule = {name: value for name, value in (("top_p", top_p), ("skip_below", skip_below)) if value is not None}
        if comparing:
            if rule:
                raise CompressedExpertsError(
                    "--top-p and --skip-below time one model's rule variants through vLLM; to compare saved models, "
                    "save the model under the rule (convert --top-p) and name it in --model"
                )
            _compared(engine, device, sources, counts, generated, prompt_tokens, repeats, text, out_dir)
            return
        if engine == "vllm":
            if len(rule) > 1:
                raise CompressedExpertsError("give --top-p or --skip-below, not both: one rule variant is timed")
            if rule:  # a valid value: before anything is converted or timed
                CEConfig(**rule)
            _served(model, counts, generated, repeats, out_dir, rule or None)
            return
        if rule:
            raise CompressedExpertsError(
                "--top-p and --skip-below are for --engine vllm (a rule variant of the served model)"
            )
        if report_only:
            benchmark.write_report(None, out_dir, doc)
            console.print(f"regenerated {doc} from {out_dir}")
            return
        if repeats < 5:
            raise CompressedExpertsError("--repeats must be at least 5: a median of fewer runs is noise")
        check_device(device)
        # Every argument and output is checked now, not after a run of many minutes.
        layer_shapes = () if shapes == "none" else csv_values(shapes, tuple(benchmark.SHAPES))
        settings = (
            csv_values(dtypes, ("bfloat16", "float32")),
            csv_values(tokens, kind=int),
            csv_values(modes, ("forward", "forward+backward")),
        )
        if not layer_shapes and not end_to_end:
            raise CompressedExpertsError("--shapes none with --no-end-to-end measures nothing")
        if compiled_decode and not end_to_end:
            raise CompressedExpertsError("--compiled-decode times the end-to-end run: leave out --no-end-to-end")
        if not doc.parent.is_dir():
            raise CompressedExpertsError(f"{doc.parent} does not exist: create it or choose another --doc")
        out_dir.mkdir(parents=True, exist_ok=True)
        for target in (out_dir, doc.parent):
            if not os.access(target, os.W_OK):
                raise CompressedExpertsError(f"cannot write to {target}")
        dtypes_, tokens_, modes_ = settings
        planned = {(sh, dt, n, mode) for sh in layer_shapes for dt in dtypes_ for n in tokens_ for mode in modes_}
        benchmark.check_mergeable(out_dir, benchmark.resolve_device(device), planned, end_to_end)
        command = "compressed-experts bench " + " ".join(a for a in sys.argv[2:] if a != "--resume")
        partial = benchmark.partial_path(out_dir, benchmark.resolve_device(device))
        if partial.exists() and not resume:
            console.print(f"{partial} holds an interrupted run's rows: starting afresh (--resume continues it)")

        def progress(text: str) -> None:
            status.update(f"benchmarking: {text}")
            if not console.is_terminal:  # a log: a line per step, so a run cut short shows where it was
                console.print(f"benchmarking: {text}")

        with console.status("benchmarking") as status:
            result = benchmark.run(
                device,
                layer_shapes,
                *settings,
                repeats,
                end_to_end,
                command,
                progress=progress,
                partial=partial,
                resume=resume,
                compiled_decode=compiled_decode,
            )
        benchmark.write_report(result, out_dir, doc)
        partial.unlink(missing_ok=True)
        console.print(Markdown(benchmark.markdown(result)))
        console.print(f"wrote {out_dir / (result['device'] + '.json')} and {doc}")

    run(action)


def _served(
    model: str, requests: tuple[int, ...], new_tokens: int, repeats: int, out_dir: Path, rule: dict | None
) -> None:
    """``bench --engine vllm``: full top-k, top-m and compressed experts of ``model`` through vLLM (and
    both under ``rule``, a per-token rule, where given)."""
    from ..checkpoint import write_atomic
    from ..serving.bench import engine_benchmark, engine_table
    from ..serving.engine import check_engine

    check_engine("vllm", model)
    out_dir.mkdir(parents=True, exist_ok=True)
    with console.status("benchmarking through vLLM") as status:
        result = engine_benchmark(
            model,
            rule=rule,
            requests=requests,
            new_tokens=new_tokens,
            repeats=repeats,
            progress=lambda text: status.update(f"benchmarking through vLLM: {text}"),
        )
    result["command"] = "compressed-experts bench " + " ".join(sys.argv[2:])
    console.print(Markdown(engine_table(result)))
    name = benchmark.engine_results_name("vllm", result["device"])
    write_atomic(out_dir / name, json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {out_dir / name}")


def _compared(
    engine: str,
    device: str,
    sources: tuple[str, ...],
    batches: tuple[int, ...],
    new_tokens: int,
    prompt: int,
    repeats: int,
    text: str | None,
    out_dir: Path,
) -> None:
    """``bench --engine transformers`` (or ``vllm`` with several models): whole saved models side by side
    (:mod:`..models_bench`)."""
    from ..checkpoint import write_atomic
    from ..fit import calibration_texts
    from ..models_bench import check_sources, models_benchmark, models_table, served_models_benchmark
    from ..serving.engine import check_engine
    from ..toy.tasks import domain_split

    check_sources(sources)
    if engine == "vllm":  # as for one model's variants: vLLM's own device, its runs are long ones
        for source in sources:
            check_engine("vllm", source)
    else:
        check_device(device)
        if repeats < 5:
            raise CompressedExpertsError("--repeats must be at least 5: a median of fewer runs is noise")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise CompressedExpertsError(f"cannot write to {out_dir}")
    with console.status("benchmarking whole models") as status:
        texts = calibration_texts(text) if text is not None else domain_split()[1]
        say = lambda step: status.update(f"benchmarking whole models: {step}")  # noqa: E731
        if engine == "vllm":
            result = served_models_benchmark(sources, texts, batches, prompt, new_tokens, repeats, progress=say)
        else:
            result = models_benchmark(sources, texts, device, batches, prompt, new_tokens, repeats, progress=say)
    result["command"] = "compressed-experts bench " + " ".join(sys.argv[2:])
    result["text"] = text or "bundled corpus, held-out files"
    console.print(Markdown(models_table(result)))
    name = benchmark.engine_results_name(engine, result["device"], sources)
    write_atomic(out_dir / name, json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {out_dir / name}")
