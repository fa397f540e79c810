"""``compressed-experts demo``: the paper's experiment, end to end, on the bundled model.

From the bundled model, fine-tune full top-8, top-4 and compressed experts (n_ce = 4) with
identical settings through the training pipeline, on the two tasks of :mod:`.tasks`;
evaluate all of them (math: exact match through the evaluation code; domain: held-out
loss), time their greedy decoding side by side, and report the paper's table (method,
active parameters per token, scores, recovery of compressed experts against full top-8,
speed-up) with a plot of score against active parameters.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench import interleaved_medians, machine
from ..checkpoint import check_output_dir, load_tokenizer, release_output, write_marker
from ..errors import CompressedExpertsError
from ..evaluation import evaluate
from ..evaluation.report import gap_closed
from ..sources import BUNDLED
from ..training import TrainConfig
from .pretrain import lm_loss
from .tasks import domain_split, math_problems, write_domain_train, write_math, write_math_eval

METHODS = ("full", "top-m", "ce")
#: How the toy recipes (the demo, the forms study) fine-tune the small bundled model on CPU:
#: float32 (no bfloat16 speed-up there), no activation checkpointing (the activations are small),
#: a short warm-up; each run replaces its own earlier output.
RECIPE_TRAINING = dict(precision="fp32", gradient_checkpointing=False, warmup=0.05, overwrite=True)
LABELS = {"full": "full top-8", "top-m": "top-4", "ce": "compressed experts"}


@dataclass(frozen=True)
class Plan:
    """How much of everything a demo run does (the default fits 15 minutes on two CPU cores)."""

    math_train: int = 4000  # problems
    math_test: int = 400
    math_steps: int = 300  # optimizer steps of 16 x 256 tokens
    domain_steps: int = 40
    domain_blocks: int = 64  # held-out sequences scored
    lr: float = 3e-3  # probed: at 1e-3 and 150 steps full top-8 solved under 7% of the problems
    ce_lr: float = 3e-2  # vectors starting at 1.0 need larger steps than weights (10x lr)
    n_ce: int = 4
    batch_size: int = 16
    seq_len: int = 256
    bench_prompts: int = 8
    bench_tokens: int = 48

    def __post_init__(self) -> None:
        small = {k: v for k, v in asdict(self).items() if not v > 0}
        if small:
            named = ", ".join(f"{k}={v}" for k, v in small.items())
            raise CompressedExpertsError(f"demo settings must be positive: {named}", settings=tuple(small))


QUICK = Plan(math_train=1000, math_test=60, math_steps=40, domain_steps=10, domain_blocks=16, bench_tokens=24)


def run_demo(
    out: Path,
    plan: Plan = Plan(),
    seeds: int = 1,
    model: str | None = None,
    say: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo into ``out`` (one run directory per seed, task and method) and return its results.

    ``out`` follows the library's output policy (:func:`compressed_experts.checkpoint.check_output_dir`):
    new or empty, or with ``overwrite`` an earlier demo's directory, which is replaced."""
    from ..training import train  # the Trainer and accelerate: imported when a run starts

    if seeds < 1:
        raise CompressedExpertsError(f"seeds must be at least 1, got {seeds}", settings=("seeds",))
    model = model or BUNDLED
    out = Path(out)
    if check_output_dir(out, overwrite=overwrite, sources={"model": model}, replaces="a demo directory"):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "demo")
        return _run_demo(out, plan, seeds, model, say, train)
    finally:
        release_output(out)


def _run_demo(out: Path, plan: Plan, seeds: int, model: str, say: Callable[[str], None], train) -> dict[str, Any]:
    started = time.perf_counter()
    data = out / "data"
    math_train = write_math(data / "math_train.jsonl", math_problems(plan.math_train, "train"))
    math_test = write_math_eval(data / "math_test.jsonl", math_problems(plan.math_test, "test"))
    domain_held = domain_split()[1]
    domain_file = write_domain_train(data / "domain_train.jsonl", plan.domain_steps, plan.batch_size, plan.seq_len)
    tokenizer = load_tokenizer(model)
    runs: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for seed in range(seeds):
        for method in METHODS:
            common = dict(
                model=model,
                method=method,
                n_ce=None if method == "full" else plan.n_ce,
                lr=plan.lr,
                ce_lr=plan.ce_lr if method == "ce" else None,
                seq_len=plan.seq_len,
                batch_size=plan.batch_size,
                seed=seed,
                logging_steps=10,
                **RECIPE_TRAINING,
            )
            say(f"seed {seed}, {LABELS[method]}: fine-tuning on math")
            run_dir = out / f"seed{seed}" / "math" / method
            fitted = train(
                TrainConfig(
                    **common, data=str(math_train), out=str(run_dir), max_steps=plan.math_steps, response_only=True
                )
            )
            say(f"seed {seed}, {LABELS[method]}: evaluating math")
            result = score_math(fitted.model, tokenizer, math_test, run_dir, run_dir.parent / f"eval_{method}.json")
            say(f"seed {seed}, {LABELS[method]}: fine-tuning on the held-out domain")
            domain_dir = out / f"seed{seed}" / "domain" / method
            adapted = train(
                TrainConfig(**common, data=str(domain_file), out=str(domain_dir), max_steps=plan.domain_steps)
            )
            loss = lm_loss(adapted.model, tokenizer, domain_held, plan.seq_len, plan.domain_blocks)
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    "math_accuracy": result["score"],
                    "domain_loss": loss,
                    "active_parameters": result["model"]["active_parameters"],
                    "train_seconds": fitted.summary["seconds"] + adapted.summary["seconds"],
                }
            )
            if seed == 0:
                models[method] = fitted.model
    say("timing greedy decoding")
    speed = _decode_speed(models, tokenizer, plan)
    results = {
        "plan": asdict(plan),
        "seeds": seeds,
        "model": model,
        "runs": runs,
        "decode_tokens_per_s": speed,
        "summary": summarise(runs, speed),
        "seconds": time.perf_counter() - started,
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    plot(results["summary"], out / "demo_plot.png")
    (out / "demo_table.md").write_text(table_markdown(results))
    return results


def score_math(model, tokenizer, data: Path, run_dir: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Exact match of a model fine-tuned on the math task (in ``run_dir``) on the test problems in ``data``:
    greedy, through ``eval``'s GSM8K scorer, every problem written to ``out`` (beside the model: an output
    never goes inside an input)."""
    return evaluate(
        model.eval(),
        tokenizer,
        "gsm8k",
        data=data,
        batch_size=32,
        max_new_tokens=128,
        prompt="alpaca",
        out=out,
        overwrite=overwrite,
        source=str(run_dir),
        progress=False,
    )


def _decode_speed(models: dict[str, Any], tokenizer, plan: Plan) -> dict[str, float]:
    """Greedy decoding tokens/s of each method's model on the same prompts, timed in turns."""
    prompts = [p.question for p in math_problems(plan.bench_prompts, "test", seed=1)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    count = plan.bench_tokens

    def run(model):
        return lambda: model.generate(
            **batch, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )

    with torch.no_grad():
        times = interleaved_medians(
            {m: run(model.eval()) for m, model in models.items()}, torch.device("cpu"), repeats=5
        )
    return {m: len(prompts) * count / t for m, t in times.items()}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed); the forms study uses it too."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], speed: dict[str, float]) -> dict[str, Any]:
    """Per method: mean and spread over seeds; recovery and gap closed of compressed experts."""
    rows = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        rows[method] = {
            "label": LABELS[method],
            "active_parameters": mine[0]["active_parameters"],
            "math_accuracy": mean_spread([r["math_accuracy"] for r in mine]),
            "domain_loss": mean_spread([r["domain_loss"] for r in mine]),
            "decode_tokens_per_s": speed.get(method),
        }
    full, top, ce_row = (rows[m] for m in METHODS)
    acc = {m: rows[m]["math_accuracy"][0] for m in METHODS}
    loss = {m: rows[m]["domain_loss"][0] for m in METHODS}
    math_gap, domain_gap = acc["full"] - acc["top-m"], loss["top-m"] - loss["full"]
    return {
        "methods": rows,
        "math_recovery": acc["ce"] / acc["full"] if acc["full"] else None,
        "math_gap_closed": gap_closed(acc["ce"], acc["top-m"], acc["full"]),
        "domain_gap_closed": gap_closed(loss["ce"], loss["top-m"], loss["full"], lower_is_better=True),
        "active_saving": 1 - ce_row["active_parameters"] / full["active_parameters"],
        "decode_speedup": (speed["ce"] / speed["full"]) if speed.get("full") else None,
        "math_gap": math_gap,
        "domain_gap": domain_gap,
    }


def _fmt(pair: tuple[float, float], pct: bool) -> str:
    mean, spread = pair
    return f"{mean:.1%} ± {spread:.1%}" if pct else f"{mean:.4f} ± {spread:.4f}"


def table_markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = [
        f"Seeds: {results['seeds']} (mean ± standard deviation over seeds).",
        "",
        "| method | active parameters / token | math exact match | domain held-out loss (lower is better) | decode tokens/s |",
        "|---|---|---|---|---|",
    ]
    for row in summary["methods"].values():
        lines.append(
            f"| {row['label']} | {row['active_parameters']:,} | {_fmt(row['math_accuracy'], True)} | "
            f"{_fmt(row['domain_loss'], False)} | {row['decode_tokens_per_s']:.0f} |"
        )

    def maybe(value, pct=True, why="n/a"):
        return why if value is None else (f"{value:.1%}" if pct else f"{value:.2f}x")

    no_gap = "n/a (top-4 did not trail full top-8)"
    lines += [
        "",
        f"- Compressed experts' math accuracy as a share of full top-8's: "
        f"{maybe(summary['math_recovery'], why='n/a (full top-8 solved none)')}",
        f"- Share of the top-4 -> full top-8 gap closed by compressed experts: math "
        f"{maybe(summary['math_gap_closed'], why=no_gap)}, domain loss {maybe(summary['domain_gap_closed'], why=no_gap)}",
        f"- Gap top-4 -> full top-8: math {summary['math_gap']:+.1%}, domain loss {summary['domain_gap']:+.4f}",
        f"- Active parameters saved by compressed experts: {summary['active_saving']:.1%}",
        f"- Decode speed-up of compressed experts over full top-8 (measured, same run): {maybe(summary['decode_speedup'], False)}",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in (
        (axes[0], "math_accuracy", "math exact match"),
        (axes[1], "domain_loss", "domain held-out loss"),
    ):
        for row in summary["methods"].values():
            mean, spread = row[key]
            ax.errorbar(row["active_parameters"] / 1e6, mean, yerr=spread, fmt="o", capsize=4, label=row["label"])
        ax.set_xlabel("active parameters per token (millions)")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("Bundled model: quality against active parameters")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


BEGIN, END = "<!-- demo:begin (written by compressed-experts demo --report; edit outside) -->", "<!-- demo:end -->"


def write_report(results: dict[str, Any], command: str, document: Path) -> None:
    """Put the table, the command and the machine between the demo markers of ``document``."""
    write_section(document, BEGIN, END, command, results["seconds"], table_markdown(results))


def write_section(document: Path, begin: str, end: str, command: str, seconds: float, table: str) -> None:
    """Put ``table``, the command and the machine between the markers ``begin`` and ``end`` of
    ``document`` (appended if it has none), keeping whatever is written around them (the discussion)."""
    block = "\n".join(
        [
            begin,
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine()}; {seconds / 60:.1f} minutes.",
            "",
            table.rstrip(),
            "",
            end,
        ]
    )
    text = document.read_text() if document.is_file() else "# Results\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    document.write_text(text)
