"""The forms study on the bundled model: how much of the top-4 -> full top-8 gap in held-out loss
each compressed-expert form wins back, at what cost in active and added parameters.

Every form is measured as converted (no data) and fitted on calibration text with no
fine-tuning (:func:`compressed_experts.fit`). ``ia3`` and ``slim`` are then fine-tuned like the
demo's domain task, with and without the distillation term: ``ia3`` from its converted state
(the paper's recipe, vectors at 1.0), ``slim`` from its fitted checkpoint (the way to use it);
``subset`` adds no parameters and is not fine-tuned here. A sweep over ``r`` and ``n_ce`` (first seed only)
gives the Pareto plot of quality against active expert parameters. Calibration and
fine-tuning text are the domain's training files; the loss is scored on its held-out files.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import from_pretrained, load_tokenizer
from ..config import CEConfig
from ..convert import ce_config_of, convert
from ..errors import CompressedExpertsError
from ..evaluation.report import gap_closed
from ..fit import calibration_blocks, fit
from ..forms import NEURON_FORMS
from ..parameters import active_parameters
from ..sources import BUNDLED
from ..training import TrainConfig
from .demo import RECIPE_TRAINING, mean_spread
from .pretrain import lm_loss
from .tasks import domain_split, write_domain_train

FORMS_STUDIED = ("ia3", "subset", "slim")
STAGES = ("as converted", "fitted", "fine-tuned", "fine-tuned + distill")


@dataclass(frozen=True)
class StudyPlan:
    """What the study measures (the default takes about half an hour for 3 seeds on two CPU cores)."""

    n_ce: int = 4
    r: int | None = None  # None: I // 8, 12 neurons for the bundled model
    seq_len: int = 256
    calib_tokens: int = 16384
    fit_steps: int = 200
    eval_blocks: int = 32  # held-out sequences scored
    #: A second slim point fitted with every seed: the sweep's best within 60% of full top-k's
    #: routed-expert parameters on its first run (2 full experts + 6 at a quarter of one each).
    second: tuple[int, int] | None = (6, 24)
    sweep_r: tuple[int, ...] = (3, 6, 12, 24, 48)
    sweep_n_ce: tuple[int, ...] = (2, 4, 6)
    finetune_steps: int = 40  # as the demo's domain task
    lr: float = 3e-3
    ce_lr: float = 3e-2  # the ia3 vectors only, as in the demo; slim's MLPs are weights and train at lr
    batch_size: int = 16
    distill_weight: float = 1.0  # probed on slim, one seed: 10 raised the loss by 0.15; 1 left it within 0.003


QUICK_STUDY = StudyPlan(
    calib_tokens=1024,
    fit_steps=10,
    eval_blocks=4,
    second=None,
    sweep_r=(6, 12),
    sweep_n_ce=(4,),
    finetune_steps=3,
    batch_size=4,
)


def run_study(
    out: Path,
    plan: StudyPlan = StudyPlan(),
    seeds: int = 1,
    model: str | None = None,
    finetune: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the study into ``out`` and return its rows and summary (also written as JSON, Markdown and a plot)."""
    from ..training import train  # the Trainer and accelerate: imported when a run starts

    if seeds < 1:
        raise CompressedExpertsError(f"seeds must be at least 1, got {seeds}", settings=("seeds",))
    model = model or BUNDLED
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    base = from_pretrained(model, dtype=torch.float32)
    top_k = base.config.num_experts_per_tok
    calibration, held = domain_split()  # calibration text: the domain's training files; scored on its held-out ones
    rows: list[dict[str, Any]] = []

    def add(stage: str, scored, seed: int | None = None, **extra) -> None:
        """Score ``scored`` and record it; its form, n_ce and r are read off the model itself."""
        counts = active_parameters(scored)
        ce = ce_config_of(scored)
        form, n_ce, r = (ce.form, ce.n_ce, ce.r) if ce is not None else ("full", 0, None)
        rows.append(
            {
                "stage": stage,
                "form": form,
                "n_ce": n_ce,
                "r": r,
                "seed": seed,
                "loss": lm_loss(scored, tokenizer, held, plan.seq_len, plan.eval_blocks),
                "expert_equivalents": counts["expert_equivalents"],
                "top_k": top_k,
                "active": counts["active"],
                "added": counts["added"],
                **extra,
            }
        )

    def converted(n_ce: int, form: str, r: int | None = None):
        return convert(copy.deepcopy(base), CEConfig(n_ce, form, r if form in NEURON_FORMS else None))

    say("scoring full top-k and top-m")
    add("reference", base)
    for n_ce in sorted({plan.n_ce, *plan.sweep_n_ce, *([plan.second[0]] if plan.second else [])}):
        add("reference", converted(n_ce, "none"))
    for form in FORMS_STUDIED:
        add("as converted", converted(plan.n_ce, form, plan.r))
    for seed in range(seeds):
        blocks = calibration_blocks(tokenizer, calibration, plan.seq_len, plan.calib_tokens, seed)
        fitted_dirs = {}
        for form in FORMS_STUDIED:
            say(f"seed {seed}: fitting {form}")
            fitted = converted(plan.n_ce, form, plan.r)
            report = fit(fitted, blocks, steps=plan.fit_steps, seed=seed, progress=False)
            add("fitted", fitted, seed, fit_seconds=report["seconds"])
            if finetune and form == "slim":
                fitted_dirs[form] = out / f"seed{seed}" / "slim-fitted"
                fitted.save_pretrained(fitted_dirs[form])
                tokenizer.save_pretrained(fitted_dirs[form])
        if plan.second is not None:
            say(f"seed {seed}: fitting slim with n_ce={plan.second[0]}, r={plan.second[1]}")
            fitted = converted(plan.second[0], "slim", plan.second[1])
            report = fit(fitted, blocks, steps=plan.fit_steps, seed=seed, progress=False)
            add("fitted", fitted, seed, fit_seconds=report["seconds"])
        if finetune:
            data = write_domain_train(
                out / "data" / "domain_train.jsonl", plan.finetune_steps, plan.batch_size, plan.seq_len
            )
            runs = [
                ("fine-tuned", "full", dict(method="full")),
                ("fine-tuned", "none", dict(method="top-m", n_ce=plan.n_ce)),
                ("fine-tuned", "ia3", dict(method="ce", form="ia3", n_ce=plan.n_ce, ce_lr=plan.ce_lr)),
                (
                    "fine-tuned + distill",
                    "ia3",
                    dict(method="ce", form="ia3", n_ce=plan.n_ce, ce_lr=plan.ce_lr, distill_weight=plan.distill_weight),
                ),
                ("fine-tuned", "slim", dict(method="ce", model=str(fitted_dirs["slim"]))),
                (
                    "fine-tuned + distill",
                    "slim",
                    dict(method="ce", model=str(fitted_dirs["slim"]), distill_weight=plan.distill_weight),
                ),
            ]
            for stage, form, settings in runs:
                say(f"seed {seed}: fine-tuning {form} ({stage})")
                settings = {"model": model, **settings}
                result = train(
                    TrainConfig(
                        data=str(data),
                        out=str(out / f"seed{seed}" / f"ft-{form}-{stage}"),
                        max_steps=plan.finetune_steps,
                        lr=plan.lr,
                        seq_len=plan.seq_len,
                        batch_size=plan.batch_size,
                        seed=seed,
                        **RECIPE_TRAINING,
                        **settings,
                    )
                )
                add(stage, result.model.eval(), seed, train_seconds=result.summary["seconds"])
    blocks = calibration_blocks(tokenizer, calibration, plan.seq_len, plan.calib_tokens, 0)
    for n_ce in plan.sweep_n_ce:
        for r in plan.sweep_r:
            for form in ("subset", "slim"):
                if any(
                    x["stage"] == "fitted" and x["seed"] == 0 and (x["form"], x["n_ce"], x["r"]) == (form, n_ce, r)
                    for x in rows
                ):
                    continue  # measured above
                say(f"sweep: fitting {form} with n_ce={n_ce}, r={r}")
                fitted = converted(n_ce, form, r)
                report = fit(fitted, blocks, steps=plan.fit_steps, seed=0, progress=False)
                add("fitted", fitted, 0, fit_seconds=report["seconds"], sweep=True)
    results = {
        "plan": asdict(plan),
        "seeds": seeds,
        "model": model,
        "rows": rows,
        "summary": summarise(rows),
        "seconds": time.perf_counter() - started,
    }
    (out / "forms_results.json").write_text(json.dumps(results, indent=2))
    (out / "forms_table.md").write_text(table_markdown(results))
    pareto_plot(rows, out / "forms_pareto.png")
    return results


def _reference(rows: list[dict[str, Any]], form: str, n_ce: int, stage: str, seed: int | None) -> float:
    """The loss of full top-k (``form="full"``) or top-m at ``n_ce`` that a row of ``stage`` is held against:
    the untuned model for converted and fitted rows, the same seed's fine-tuned one for fine-tuned rows."""
    tuned = stage.startswith("fine-tuned")
    for row in rows:
        if (
            row["form"] == form
            and (form == "full" or row["n_ce"] == n_ce)
            and ((row["stage"] == "fine-tuned" and row["seed"] == seed) if tuned else row["stage"] == "reference")
        ):
            return row["loss"]
    raise CompressedExpertsError(f"the study has no {form} reference for {stage} rows")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each (stage, form, n_ce, r), with the share of the top-m -> top-k gap closed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["form"], row["n_ce"], row["r"]), []).append(row)
    summary = []
    for (stage, form, n_ce, r), members in groups.items():
        closed = []
        if form in FORMS_STUDIED:
            for row in members:
                full, top_m = (_reference(rows, f, n_ce, stage, row["seed"]) for f in ("full", "none"))
                share = gap_closed(row["loss"], top_m, full, lower_is_better=True)
                closed.append(float("nan") if share is None else share)
        first = members[0]
        summary.append(
            {
                "stage": stage,
                "form": form,
                "n_ce": n_ce,
                "r": r,
                "seeds": len(members),
                "loss": mean_spread([m["loss"] for m in members]),
                "gap_closed": mean_spread(closed) if closed else None,
                "expert_equivalents": first["expert_equivalents"],
                "top_k": first["top_k"],
                "added": first["added"],
                "sweep": bool(first.get("sweep")),
                "fit_seconds": mean_spread([m["fit_seconds"] for m in members]) if "fit_seconds" in first else None,
            }
        )
    return summary


def table_markdown(results: dict[str, Any]) -> str:
    """The main table (the sweep is in the plot and the JSON)."""
    lines = [
        f"Seeds: {results['seeds']} (mean ± standard deviation over seeds; as converted and references need none).",
        "",
        "| stage | form | n_ce | r | expert-equivalents per token (share of full top-k) | added parameters | "
        "held-out loss | top-m → top-k gap closed | fit time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        if row["sweep"]:
            continue
        loss, closed, fit_time = row["loss"], row["gap_closed"], row["fit_seconds"]
        share = row["expert_equivalents"] / row["top_k"]
        label = {"full": "full top-k", "none": "top-m"}.get(row["form"], row["form"])
        lines.append(
            f"| {row['stage']} | {label} | {row['n_ce']} | {row['r'] if row['r'] is not None else '-'} | "
            f"{row['expert_equivalents']:.2f} ({share:.0%}) | {row['added']:,} | {loss[0]:.4f} ± {loss[1]:.4f} | "
            f"{f'{closed[0]:.0%} ± {closed[1]:.0%}' if closed else '-'} | "
            f"{f'{fit_time[0]:.0f} s' if fit_time else '-'} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Held-out loss against active expert parameters (as a share of full top-k's), fitted forms and references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {
        "none": ("top-m", "s", "grey"),
        "subset": ("subset (fitted)", "^", "tab:blue"),
        "slim": ("slim (fitted)", "o", "tab:orange"),
        "ia3": ("ia3 (fitted)", "D", "tab:green"),
    }
    for form, (label, marker, color) in styles.items():
        stage = "reference" if form == "none" else "fitted"
        points = sorted(
            (r["expert_equivalents"] / r["top_k"], r["loss"], r["r"])
            for r in rows
            if r["form"] == form and r["stage"] == stage and r["seed"] in (None, 0)
        )
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=label)
            for x, y, r in points:
                if r is not None:
                    ax.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=(4, 2), fontsize=7, color=color)
    full = next(r["loss"] for r in rows if r["form"] == "full" and r["stage"] == "reference")
    ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full top-k")
    ax.set_xlabel("active routed-expert parameters per token (share of full top-k)")
    ax.set_ylabel("held-out loss (no fine-tuning)")
    ax.set_title("Bundled model: compressed-expert forms, fitted on calibration text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


BEGIN = "<!-- forms:begin (written by compressed-experts toy forms --report; edit outside) -->"
END = "<!-- forms:end -->"
