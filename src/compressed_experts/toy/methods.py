"""The methods study on the bundled model (issue 18): every way the library makes it cheaper, side by side.

Every method runs at the same budgets of expert-equivalents per token and MoE block (the
routed-expert parameters a token runs, in units of one full expert; full top-8 is 8), so that
they are compared at equal compute, and is scored by held-out loss on the domain's held-out
files, as the forms study does:

- ``top-m``: the ``m = budget`` heaviest experts, the rest dropped;
- ``ia3``, ``subset``, ``slim``: the compressed-expert forms fitted training-free with
  :func:`compressed_experts.fit`. ``ia3`` keeps ``m = budget`` (its vectors cost a hundredth of an
  expert each). ``subset`` and ``slim`` keep fewer main experts and give the rest ``r`` neurons
  each so that ``m + n_ce * r / I`` is as close to the budget as ``r`` allows; which ``m`` is chosen
  on the first seed's calibration text (the ``subset`` fit of least calibration loss, cheap since
  ``subset`` only chooses neurons), and ``slim`` takes the same split (it starts as ``subset``);
- ``top_p``, ``skip_below``: a per-token rule whose threshold is found by bisection on the
  calibration text so that the measured average expert-equivalents match the budget (form ``none``);
- ``planned``: :func:`compressed_experts.plan.plan` chooses each block's setting among ``none`` and
  ``subset`` (its cheap candidates) on the calibration text; the plan as converted, then fitted
  (``subset`` blocks choose their neurons on the text), then with its ``subset`` blocks as ``slim``
  fitted (the planner plans ``slim``'s starting point);
- ``pruned``: :func:`compressed_experts.prune.prune` at several ``keep``. Pruning saves memory,
  not compute: every token still runs 8 full experts, so its rows sit at 8 expert-equivalents and
  belong on the second plot, against total parameters in memory;
- ``pruned, slim stand-ins``: the same pruning with the removed experts standing in as ``slim``
  MLPs of the default ``r`` (an eighth of an expert's neurons), fitted like the forms: the router
  still picks every expert, so tokens run fewer full experts (those routed to removed experts get
  their stand-ins) and the rows sit on both plots. Seeds change their calibration draw; their
  fitting batches are ``prune``'s (seed 0) on every seed.

"Gap closed" is the share of the top-m -> full top-k gap in held-out loss that a method wins back
at its budget (``budget`` main experts against 8). Seeds change the calibration draw, the fitting
batches and the fine-tuning; a fine-tuned stage repeats the demo's domain fine-tuning from each
method's training-free model (at the budgets asked for; pruning plain and with stand-ins at
``finetune_keeps``), and is held against full top-k and top-m fine-tuned the same way with the same
seed (a plainly pruned model trains every weight, as full top-k does; one with stand-ins trains as a
converted model, its stand-ins at ``ce_lr``'s default). The math stage does the
same for ``math_methods`` (the best of each family; 600 steps a run) with the demo's math task
(``math_steps`` of fine-tuning on generated word problems from each training-free model, then exact
match on held-out problems, greedy, through ``eval``'s GSM8K scorer): the task on which the demo
separates full top-8 from top-4, and the issue's second measure. Rows are written to ``methods_rows.json`` as they are
measured, so an interrupted run keeps what it did: ``--report-only`` renders it, ``--resume``
measures the rest.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..architectures import family_of, moe_blocks
from ..checkpoint import MARKER, from_pretrained, load_tokenizer, save_model, skeleton, write_atomic
from ..config import CEConfig
from ..convert import convert
from ..errors import CompressedExpertsError
from ..evaluation.report import gap_closed
from ..fit import calibration_blocks, fit
from ..parameters import active_parameters
from ..plan import MIN_PLAN_TOKENS, PlanConfig, plan
from ..prune import check_prunable, min_calibration_tokens, prune
from ..sources import BUNDLED
from ..text import token_blocks
from ..training import TrainConfig
from .demo import RECIPE_TRAINING, mean_spread, score_math
from .pretrain import blocks_loss, lm_loss
from .tasks import domain_split, math_problems, write_domain_train, write_math, write_math_eval

#: The methods, in the table's order ("full top-k" is the reference every gap is measured to).
METHODS = (
    "top-m",
    "ia3",
    "subset",
    "slim",
    "top_p",
    "skip_below",
    "planned",
    "planned, fitted",
    "planned, slim fitted",
    "pruned",
    "pruned, slim stand-ins",
)
#: How far a method's measured expert-equivalents may sit from its budget: ``ia3``'s vectors cost
#: ``(k - m)·(2H + I)/(3·H·I)`` of an expert (0.067 at most on the bundled model), ``r`` is whole
#: (``n_ce/(2·I)`` at most, 0.037), the rules' bisection stops within 0.02 on the calibration text,
#: and the planner rounds costs up to 1/64 of an expert per block. The planner is held to its budget
#: from above only: where no mix of its candidates fills the budget its plan falls below it (by 0.09
#: at budget 2 on one seed of the study).
TOLERANCE = 0.07
STAGES = ("training-free", "fine-tuned")
#: The math stage's rows (exact match, not held-out loss: their own table).
MATH = "math"
#: Methods a fine-tuned stage can repeat (from their training-free model); full top-k and top-m, the
#: references of its gaps, are always fine-tuned.
FINETUNABLE = ("ia3", "subset", "slim", "top_p", "skip_below", "planned, fitted", "planned, slim fitted")
RULES = ("top_p", "skip_below")
#: Pruning with stand-ins, as the table names it.
PRUNED_STAND_INS = "pruned, slim stand-ins"
PRUNED = ("pruned", PRUNED_STAND_INS)
#: Settings a resumed study may extend (more methods through a tuned stage) without remeasuring.
ADDITIVE = ("finetune_methods", "math_methods", "finetune_keeps")
#: Every row so far, rewritten after each measurement.
ROWS = "methods_rows.json"


@dataclass(frozen=True)
class MethodsPlan:
    """What the study measures (the default: about 17 minutes a seed training-free on two busy CPU cores,
    and about 5 more a seed for the fine-tuned budget-4 rows)."""

    budgets: tuple[int, ...] = (2, 3, 4, 5, 6)
    keeps: tuple[int, ...] = (48, 32, 24, 16)  # experts kept per block by pruning (of 64)
    seq_len: int = 256
    calib_tokens: int = 16384
    #: The planner's calibration: the first of the calibration tokens. 8,192 (the plan command's default):
    #: one plan for every budget takes about a minute with it.
    plan_tokens: int = 8192
    fit_steps: int = 200
    eval_blocks: int = 32  # held-out sequences scored
    search_steps: int = 14  # bisection steps of a rule's threshold
    finetune_budgets: tuple[int, ...] = (4,)
    #: Every method that fine-tunes from its training-free model or setting (pruning: ``finetune_keeps``).
    finetune_methods: tuple[str, ...] = FINETUNABLE
    #: The keeps whose pruned models, plain and with stand-ins, the fine-tuned stage fine-tunes too.
    finetune_keeps: tuple[int, ...] = (32, 16)
    finetune_steps: int = 40  # as the demo's domain task
    lr: float = 3e-3
    ce_lr: float = 3e-2  # the ia3 vectors only, as in the demo
    batch_size: int = 16
    #: The math stage, as the demo's table runs it (RESULTS.md: at 300 steps the methods do not separate).
    math_steps: int = 600
    math_train: int = 4000  # problems
    math_test: int = 400
    #: The fine-tuned methods also taken through the math stage (600 steps each: about 9 minutes here), the
    #: best of each family at budget 4 training-free (ia3 after fine-tuning: the forms study).
    math_methods: tuple[str, ...] = ("slim", "top_p", "planned, slim fitted")

    def __post_init__(self) -> None:
        if not self.budgets:
            raise CompressedExpertsError("give at least one budget", settings=("budgets",))
        for budget in self.budgets:
            if isinstance(budget, bool) or not float(budget).is_integer() or budget < 1:
                raise CompressedExpertsError(
                    f"budgets are whole numbers of expert-equivalents, 1 or more (top-m runs whole experts), "
                    f"got {budget!r}",
                    settings=("budgets",),
                )
        object.__setattr__(self, "budgets", tuple(sorted({int(b) for b in self.budgets})))
        object.__setattr__(self, "finetune_budgets", tuple(sorted({int(b) for b in self.finetune_budgets})))
        outside = [b for b in self.finetune_budgets if b not in self.budgets]
        if outside:
            raise CompressedExpertsError(
                f"fine-tuned budgets {outside} are not among the budgets {list(self.budgets)}",
                settings=("finetune_budgets",),
            )
        unknown = [m for m in self.finetune_methods if m not in FINETUNABLE]
        if unknown:
            raise CompressedExpertsError(
                f"cannot fine-tune {unknown}: choose from {', '.join(FINETUNABLE)}", settings=("finetune_methods",)
            )
        unpruned = [int(k) if float(k).is_integer() else k for k in self.finetune_keeps if k not in self.keeps]
        if unpruned:
            raise CompressedExpertsError(
                f"finetune_keeps {unpruned} are not among the keeps {list(self.keeps)}",
                settings=("finetune_keeps",),
            )
        object.__setattr__(self, "finetune_keeps", tuple(int(k) for k in dict.fromkeys(self.finetune_keeps)))
        untuned = [m for m in self.math_methods if m not in self.finetune_methods]
        if untuned:
            raise CompressedExpertsError(
                f"math_methods {untuned} are not among the fine-tuned methods ({', '.join(self.finetune_methods)})",
                settings=("math_methods",),
            )
        for name in ("math_steps", "math_train", "math_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressedExpertsError(
                    f"{name} must be a whole number, 1 or more; got {value!r}", settings=(name,)
                )
        if self.plan_tokens < MIN_PLAN_TOKENS or self.plan_tokens > self.calib_tokens:
            raise CompressedExpertsError(
                f"plan_tokens must be from {MIN_PLAN_TOKENS} to calib_tokens ({self.calib_tokens}), "
                f"got {self.plan_tokens}",
                settings=("plan_tokens",),
            )


def check_study(settings: MethodsPlan, seeds: int, model: str) -> tuple[int, int, int]:
    """Refuse seeds, budgets, keeps or calibration that the study or ``model`` cannot serve, before
    any work (the model is built on the meta device, from its config); returns (top-k, experts, I)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompressedExpertsError(f"seeds must be a whole number, at least 1; got {seeds!r}", settings=("seeds",))
    shape = skeleton(model)
    top_k = shape.config.num_experts_per_tok
    high = [b for b in settings.budgets if b > top_k]
    if high:
        raise CompressedExpertsError(
            f"budget {high[0]} is above full top-k: the model runs {top_k} experts per token; "
            f"give budgets from 1 to {top_k}",
            settings=("budgets",),
        )
    for keep in settings.keeps:
        check_prunable(shape, keep)
    experts = next(iter(moe_blocks(shape, family_of(shape))))[1].experts
    count = experts.gate_up_proj.shape[0]
    least = min_calibration_tokens(count, top_k)
    if settings.calib_tokens < least:
        raise CompressedExpertsError(
            f"calib_tokens {settings.calib_tokens} is too few to rank {count} experts for pruning (at least {least})",
            settings=("calib_tokens",),
        )
    return top_k, count, experts.down_proj.shape[-1]


QUICK_METHODS = MethodsPlan(
    budgets=(2, 4),
    keeps=(32,),
    calib_tokens=2048,
    plan_tokens=1024,
    fit_steps=10,
    eval_blocks=4,
    search_steps=8,
    finetune_budgets=(4,),
    finetune_methods=("slim",),
    finetune_keeps=(32,),
    finetune_steps=3,
    batch_size=4,
    math_steps=3,
    math_train=64,
    math_test=8,
    math_methods=("slim",),
)


def split_r(budget: int, main: int, top_k: int, intermediate: int) -> int:
    """The neurons per auxiliary expert that bring ``main`` full experts plus ``top_k - main``
    auxiliary ones closest to ``budget`` expert-equivalents (``main + n_ce * r / I``)."""
    return min(intermediate, max(1, round((budget - main) * intermediate / (top_k - main))))


def _rule_model(base, rule: str, value: float):
    return convert(copy.deepcopy(base), CEConfig(form="none", **{rule: value}))


def match_rule(base, rule: str, budget: float, blocks: torch.Tensor, steps: int) -> tuple[float, float]:
    """The threshold of ``rule`` (``top_p`` or ``skip_below``, form ``none``) whose measured average
    expert-equivalents on ``blocks`` is closest to ``budget``, by bisection; returns (threshold, measured).

    More experts run as ``top_p`` rises and as ``skip_below`` falls; the measure is the converted
    model's own (later blocks see the earlier blocks' rule)."""
    low, high, best = 0.0, 1.0, None
    for _ in range(steps):
        value = (low + high) / 2
        measured = active_parameters(_rule_model(base, rule, value), input_ids=blocks)["expert_equivalents"]
        if best is None or abs(measured - budget) < abs(best[1] - budget):
            best = (value, measured)
        if abs(measured - budget) < 0.01:
            break
        if (measured < budget) == (rule == "top_p"):
            low = value
        else:
            high = value
    return best


def run_methods(
    out: Path,
    settings: MethodsPlan = MethodsPlan(),
    seeds: int = 3,
    model: str | None = None,
    finetune: bool = True,
    say: Callable[[str], None] = print,
    resume: bool = False,
    math: bool = True,
) -> dict[str, Any]:
    """Run the study into ``out`` and return its rows and summary (also written as JSON, Markdown and two plots).

    ``finetune`` runs the domain fine-tuned stage, ``math`` the math stage (both at ``finetune_budgets``,
    for ``finetune_methods``, the math stage only ``math_methods`` of them, and their references).

    With ``resume``, the rows an interrupted run saved in ``out`` are kept and only the rest is
    measured (the same settings and model; seeds may be added, never dropped): a training-free model
    that the fine-tuned stage starts from is rebuilt only if the run did not save it whole."""
    from ..training import train  # the Trainer and accelerate: imported when a run starts

    model = model or BUNDLED
    top_k, num_experts, intermediate = check_study(settings, seeds, model)
    out = Path(out)
    earlier = _resumable(out, settings, model) if resume else {}
    seeds = max(seeds, earlier.get("seeds", 0))  # the rows kept are those seeds' too
    base = from_pretrained(model, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter() - earlier.get("seconds", 0.0)
    tokenizer = load_tokenizer(model)
    calibration, held = domain_split()  # calibration text: the domain's training files; scored on its held-out ones
    held_blocks = token_blocks(tokenizer, held, settings.seq_len, settings.eval_blocks)
    rows: list[dict[str, Any]] = list(earlier.get("rows", []))
    results = {"settings": asdict(settings), "seeds": seeds, "model": model, "top_k": top_k, "rows": rows}
    done = {_key(row) for row in rows}

    def record(row: dict[str, Any]) -> None:
        """Keep ``row`` and write every row so far (an interrupted run keeps them)."""
        rows.append(row)
        done.add(_key(row))
        results["seconds"] = time.perf_counter() - started
        write_atomic(out / ROWS, json.dumps(results, indent=1))  # what --resume and --report-only read

    def add(stage: str, method: str, budget: int | None, seed: int | None, scored, setting: str, calib, **extra):
        """Score ``scored`` by held-out loss and :func:`record` it."""
        counts = active_parameters(scored, input_ids=calib)
        record(
            {
                "stage": stage,
                "method": method,
                "budget": budget,
                "seed": seed,
                "setting": setting,
                "loss": lm_loss(scored, tokenizer, held, settings.seq_len, settings.eval_blocks),
                "expert_equivalents": counts["expert_equivalents"],
                "heldout_expert_equivalents": active_parameters(scored, input_ids=held_blocks)["expert_equivalents"],
                "total": counts["total"],
                "added": counts["added"],
                **extra,
            }
        )

    def fitted(configs, blocks, seed: int):
        converted = convert(copy.deepcopy(base), configs)
        report = fit(converted, blocks, steps=settings.fit_steps, seed=seed, progress=False)
        return converted, report["seconds"]

    # (method, budget, seed, keep) -> a training-free model to fine-tune
    saved: dict[tuple[str, int | None, int, int | None], Path] = {}

    def needed(method: str, budget: int | None, seed: int, keep: int | None = None) -> bool:
        """Whether a tuned stage (domain fine-tuning, math) that runs starts from this saved training-free
        model and has not run yet: not ia3 (fine-tuned from vectors at 1.0, the paper's recipe) nor the
        rules (from their threshold); a pruned model (``keep``) only in the domain fine-tuning."""
        if keep is not None:
            return finetune and keep in settings.finetune_keeps and ("fine-tuned", method, None, seed, keep) not in done
        stages = [
            stage
            for stage, on, methods in (
                ("fine-tuned", finetune, settings.finetune_methods),
                (MATH, math, settings.math_methods),
            )
            if on and method in methods
        ]
        from_saved = method != "ia3" and method not in RULES
        pending = any((stage, method, budget, seed, None) not in done for stage in stages)
        return budget in settings.finetune_budgets and from_saved and pending

    def measure(
        method: str,
        budget: int | None,
        seed: int,
        calib,
        build: Callable[[], tuple[Any, str, dict]],
        keep: int | None = None,
    ) -> None:
        """Build, score and (for a tuned stage) save one training-free model, unless a resumed run has
        its row and, where a tuned stage needs it, its saved model. Pruned models go by ``keep``."""
        path = out / f"seed{seed}" / f"{_slug(method)}-{budget if keep is None else f'keep{keep}'}"
        scored = ("training-free", method, budget, seed, keep) in done
        if scored and (not needed(method, budget, seed, keep) or path.is_dir()):
            saved[(method, budget, seed, keep)] = path
            return
        built, setting, extra = build()
        if not scored:
            add("training-free", method, budget, seed, built, setting, calib, **extra)
        if needed(method, budget, seed, keep):  # staged beside, then moved: a folder here is a whole model
            save_model(built, path, tokenizer=tokenizer)
            saved[(method, budget, seed, keep)] = path

    fixed = [b for b in settings.budgets if b < top_k]  # at full top-k every method is full top-k
    say("scoring full top-k and top-m")
    calib0 = calibration_blocks(tokenizer, calibration, settings.seq_len, settings.calib_tokens, 0)
    if ("training-free", "full top-k", top_k, None, None) not in done:
        add("training-free", "full top-k", top_k, None, base, "all experts", calib0)
    for budget in settings.budgets:
        if ("training-free", "top-m", budget, None, None) not in done:
            config = CEConfig(top_k - budget, "none")
            add(
                "training-free",
                "top-m",
                budget,
                None,
                convert(copy.deepcopy(base), config),
                f"n_ce {top_k - budget}",
                calib0,
            )
    # Which split of each budget subset and slim take: the subset fit of least calibration loss, first seed.
    splits = {int(b): CEConfig(c["n_ce"], "subset", c["r"]) for b, c in earlier.get("splits", {}).items()}
    for budget in fixed:
        losses = {}
        for main in range(1, budget) if budget not in splits else ():
            say(f"choosing the split at budget {budget}: subset with {main} main experts")
            config = CEConfig(top_k - main, "subset", split_r(budget, main, top_k, intermediate))
            losses[config] = blocks_loss(fitted(config, calib0, 0)[0], calib0)
        if losses:
            splits[budget] = min(losses, key=losses.get)
    results["splits"] = {str(b): {"n_ce": c.n_ce, "r": c.r} for b, c in sorted(splits.items())}
    thresholds = {(r["method"], r["budget"], r["seed"]): r["threshold"] for r in rows if "threshold" in r}

    def fitted_form(config: CEConfig, budget: int, seed: int, calib):
        say(f"seed {seed}, budget {budget}: fitting {config.form}")
        built, seconds = fitted(config, calib, seed)
        return built, f"n_ce {config.n_ce}" + (f", r {config.r}" if config.r else ""), dict(fit_seconds=seconds)

    def ruled(rule: str, budget: int, seed: int, calib):
        say(f"seed {seed}, budget {budget}: matching {rule} on the calibration text")
        value, _ = match_rule(base, rule, budget, calib, settings.search_steps)
        thresholds[(rule, budget, seed)] = value
        return _rule_model(base, rule, value), f"{rule} {value:.4f}", dict(threshold=value)

    def planned_model(method: str, configs: list[CEConfig], layers: list[CEConfig], row: dict, seed: int, calib):
        setting = "per block: " + ", ".join(_short(c) for c in layers)  # the plan's own, slim or not
        if method == "planned":  # as converted
            return convert(copy.deepcopy(base), configs), setting, {}
        say(f"seed {seed}, budget {row['budget']}: {method}")
        if any(c.form != "none" and c.n_ce for c in configs):
            built, seconds = fitted(configs, calib, seed)
        else:  # a plan of top-m blocks only: nothing to fit
            built, seconds = convert(copy.deepcopy(base), configs), 0.0
        return built, setting, dict(fit_seconds=seconds, layers=row["layers"])

    def pruned_model(method: str, count: int, seed: int, calib):
        built = copy.deepcopy(base)
        if method == PRUNED_STAND_INS:
            say(f"seed {seed}: pruning to {count} experts per block, fitting slim stand-ins for the rest")
            report = prune(built, calib, keep=count, stand_in="slim", fit_steps=settings.fit_steps)
            return built, f"keep {count} of {num_experts}, r {report['stand_in']['r']}", dict(keep=count)
        say(f"seed {seed}: pruning to {count} experts per block")
        prune(built, calib, keep=count)
        return built, f"keep {count} of {num_experts}", dict(keep=count)

    planned_methods = ("planned", "planned, fitted", "planned, slim fitted")
    for seed in range(seeds):
        calib = calibration_blocks(tokenizer, calibration, settings.seq_len, settings.calib_tokens, seed)
        for budget in fixed:
            measure(
                "ia3", budget, seed, calib, partial(fitted_form, CEConfig(top_k - budget, "ia3"), budget, seed, calib)
            )
            for form in ("subset", "slim") if budget in splits else ():
                measure(
                    form,
                    budget,
                    seed,
                    calib,
                    partial(fitted_form, replace(splits[budget], form=form), budget, seed, calib),
                )
            for rule in RULES:
                measure(rule, budget, seed, calib, partial(ruled, rule, budget, seed, calib))
        if any(
            ("training-free", method, budget, seed, None) not in done or needed(method, budget, seed)
            for method in planned_methods
            for budget in fixed
        ):
            say(f"seed {seed}: planning every budget (none and subset candidates, {settings.plan_tokens} tokens)")
            planned = plan(
                copy.deepcopy(base),
                calib[: settings.plan_tokens // settings.seq_len],
                PlanConfig(budget=str(fixed[0])),
                frontier=fixed[1:],
            )
            for row in planned.frontier:
                layers = [CEConfig.from_dict(layer) for layer in row["layers"]]
                slim = [replace(c, form="slim") if c.form == "subset" else c for c in layers]
                for method, configs in zip(planned_methods, (layers, layers, slim)):
                    measure(
                        method,
                        int(row["budget"]),
                        seed,
                        calib,
                        partial(planned_model, method, configs, layers, row, seed, calib),
                    )
        for method in PRUNED:
            for count in settings.keeps:
                measure(method, None, seed, calib, partial(pruned_model, method, count, seed, calib), keep=count)

    def setting_of(method: str, budget: int | None, seed: int, keep: int | None = None) -> str:
        """The setting its training-free row names."""
        key = ("training-free", method, budget, seed, keep)
        return next(r["setting"] for r in rows if _key(r) == key)

    def tuned_runs(
        seed: int, methods: tuple[str, ...], keeps: tuple[int, ...] = ()
    ) -> list[tuple[str, int | None, dict[str, Any], str, int | None]]:
        """(method, budget, training spec, setting, keep) of every run a tuned stage makes for ``seed``:
        full top-k, at each fine-tuned budget top-m and ``methods``, each from its training-free model,
        and the models pruned to ``keeps`` (plain: every weight trained, as full top-k; with stand-ins:
        as a converted model)."""
        runs = [("full top-k", top_k, dict(method="full"), "all experts", None)]
        for budget in settings.finetune_budgets:
            n_ce = top_k - budget
            runs.append(("top-m", budget, dict(method="top-m", n_ce=n_ce), f"n_ce {n_ce}", None))
            for method in methods:
                if method == "ia3":  # the paper's recipe: from the vectors at 1.0, as the demo does
                    spec = dict(method="ce", form="ia3", n_ce=n_ce, ce_lr=settings.ce_lr)
                elif method in RULES:
                    spec = dict(method="top-m", **{method: thresholds[(method, budget, seed)]})
                elif (method, budget, seed, None) in saved:
                    spec = dict(method="ce", model=str(saved[(method, budget, seed, None)]))
                else:
                    continue  # no such model at this budget (subset and slim below 2)
                runs.append((method, budget, spec, setting_of(method, budget, seed), None))
        for method in PRUNED:
            for keep in keeps:
                if (method, None, seed, keep) in saved:  # else its fine-tuned row was kept from an earlier run
                    spec = dict(
                        method="full" if method == "pruned" else "ce", model=str(saved[(method, None, seed, keep)])
                    )
                    runs.append((method, None, spec, setting_of(method, None, seed, keep), keep))
        return runs

    def tuned(
        stage: str,
        method: str,
        budget: int | None,
        seed: int,
        spec: dict[str, Any],
        data: Path,
        steps: int,
        keep: int | None = None,
        **extra,
    ):
        """Fine-tune one run of a tuned stage (its model beside the others of the seed)."""
        size = budget if keep is None else f"keep{keep}"
        name = f"{'ft' if stage == 'fine-tuned' else stage}-{_slug(method)}-{size}"
        config = TrainConfig(
            data=str(data),
            out=str(out / f"seed{seed}" / name),
            max_steps=steps,
            lr=settings.lr,
            seq_len=settings.seq_len,
            batch_size=settings.batch_size,
            seed=seed,
            **RECIPE_TRAINING,
            **{"model": model, **spec},
            **extra,
        )
        return train(config), Path(config.out)

    if finetune and (settings.finetune_budgets or settings.finetune_keeps):  # what needed() saved models for
        data = write_domain_train(
            out / "data" / "domain_train.jsonl", settings.finetune_steps, settings.batch_size, settings.seq_len
        )
        for seed in range(seeds):
            calib = calibration_blocks(tokenizer, calibration, settings.seq_len, settings.calib_tokens, seed)
            for method, budget, spec, setting, keep in tuned_runs(
                seed, settings.finetune_methods, settings.finetune_keeps
            ):
                if ("fine-tuned", method, budget, seed, keep) in done:
                    continue
                say(f"seed {seed}, {f'budget {budget}' if keep is None else f'keep {keep}'}: fine-tuning {method}")
                result, _ = tuned("fine-tuned", method, budget, seed, spec, data, settings.finetune_steps, keep)
                kept = {} if keep is None else dict(keep=keep)
                add(
                    "fine-tuned",
                    method,
                    budget,
                    seed,
                    result.model.eval(),
                    setting,
                    calib,
                    train_seconds=result.summary["seconds"],
                    **kept,
                )
    if math and settings.finetune_budgets:
        data_dir = out / "data"
        math_train = write_math(data_dir / "math_train.jsonl", math_problems(settings.math_train, "train"))
        math_test = write_math_eval(data_dir / "math_test.jsonl", math_problems(settings.math_test, "test"))
        for seed in range(seeds):
            for method, budget, spec, setting, _ in tuned_runs(seed, settings.math_methods):
                if (MATH, method, budget, seed, None) in done:
                    continue
                say(f"seed {seed}, budget {budget}: fine-tuning {method} on math")
                result, run_dir = tuned(
                    MATH, method, budget, seed, spec, math_train, settings.math_steps, response_only=True
                )
                say(f"seed {seed}, budget {budget}: scoring {method} on math")
                # overwrite: an evaluation left by a run interrupted before its row was saved
                scored = score_math(
                    result.model, tokenizer, math_test, run_dir, run_dir.with_name(run_dir.name + "-eval.json"), True
                )
                record(
                    {
                        "stage": MATH,
                        "method": method,
                        "budget": budget,
                        "seed": seed,
                        "setting": setting,
                        "exact_match": scored["score"],
                        "train_seconds": result.summary["seconds"],
                    }
                )
    results["seconds"] = time.perf_counter() - started
    return render(out, results)


def _slug(method: str) -> str:
    """A method's name as a folder name (``planned, slim fitted``: ``planned-slim-fitted``)."""
    return method.replace(", ", "-").replace(" ", "-")


def _key(row: dict[str, Any]) -> tuple:
    """What identifies a row: stage, method, budget, seed, and for pruning the experts kept."""
    return (row["stage"], row["method"], row["budget"], row["seed"], row.get("keep"))


def _resumable(out: Path, settings: MethodsPlan, model: str) -> dict[str, Any]:
    """The rows of the run in ``out`` that ``resume`` continues; refused if it measured something else
    (methods added to a tuned stage are measured, not refused)."""
    earlier = saved_rows(out)
    now = json.loads(json.dumps(asdict(settings)))  # as saved: tuples are lists there
    # A setting added to the study since that run started (the math stage's) measured nothing in it: it
    # takes the value asked for now.
    then = {k: earlier["settings"].get(k, now.get(k)) for k in set(now) | set(earlier["settings"])}
    # Methods added to a tuned stage add rows and change none: the rows measured stay valid.
    grown = {k for k in ADDITIVE if isinstance(now.get(k), list) and set(then[k] or ()) <= set(now[k])}
    changed = sorted(k for k in then if now.get(k) != then[k] and k not in grown)
    if earlier["model"] != model:
        changed.insert(0, f"model {earlier['model']}")
    if changed:
        raise CompressedExpertsError(
            f"the study in {out} was measured with other settings ({', '.join(changed)}): resume it with the "
            "settings it started with, or start again with --overwrite"
        )
    return earlier


def render(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Summarise ``results``' rows and write the results JSON, the table and the two plots into ``out``."""
    results["summary"] = summarise(results["rows"], results["top_k"])
    results["math_summary"] = summarise_math(results["rows"], results["top_k"])
    (out / "methods_results.json").write_text(json.dumps(results, indent=1))
    (out / "methods_table.md").write_text(table_markdown(results))
    pareto_plots(results, out / "methods_pareto_active.png", out / "methods_pareto_memory.png")
    return results


def saved_rows(out: Path) -> dict[str, Any]:
    """The rows a run in ``out`` wrote as it measured them, finished or not (an interrupted run's
    are rendered with :func:`render`). Rows of a run from before the elapsed time was saved with
    them get the time from the study's start (its marker) to the last row."""
    path = Path(out) / ROWS
    if not path.is_file():
        raise CompressedExpertsError(f"{path} does not exist: no methods study has written rows into {out}")
    results = json.loads(path.read_text())
    if "seconds" not in results:
        results["seconds"] = path.stat().st_mtime - (Path(out) / MARKER).stat().st_mtime
    return results


def _short(config: CEConfig) -> str:
    """A block's setting in a few characters: ``n_ce 4 subset r 24``, ``n_ce 4 none``, or ``full``."""
    if not config.n_ce and config.n_ce is not None:
        return "full"
    return f"{config.rule.replace('=', ' ')} {config.form}" + (f" r {config.r}" if config.r else "")


def _reference(rows: list[dict[str, Any]], method: str, budget: int, stage: str, seed: int | None) -> float | None:
    """The loss of full top-k or top-m at ``budget`` that a row of ``stage`` is held against: the
    untuned model's for training-free rows, the same seed's fine-tuned one for fine-tuned rows."""
    tuned = stage == "fine-tuned"
    for row in rows:
        if (
            row["method"] == method
            and (method == "full top-k" or row["budget"] == budget)
            and row["stage"] == stage
            and (row["seed"] == seed if tuned else True)
        ):
            return row["loss"]
    return None


def summarise(rows: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """Mean and spread over seeds of each (stage, method, budget; pruning: keep), with the share of
    the top-m -> full top-k gap closed at the row's budget."""
    rows = [row for row in rows if row["stage"] != MATH]  # exact match, not loss: summarise_math
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["method"], row["budget"], row.get("keep")), []).append(row)
    seeded = {key: len({m["seed"] for m in members if m["seed"] is not None}) for key, members in groups.items()}
    summary = []
    for (stage, method, budget, kept), members in groups.items():
        closed = []
        if method not in ("full top-k", "top-m", "pruned", PRUNED_STAND_INS) and budget is not None and budget < top_k:
            for row in members:
                full, top_m = (_reference(rows, m, budget, stage, row["seed"]) for m in ("full top-k", "top-m"))
                share = (
                    None
                    if full is None or top_m is None
                    else gap_closed(row["loss"], top_m, full, lower_is_better=True)
                )
                if share is not None:  # None: no reference, or top-m does not trail on this seed
                    closed.append(share)
        settings = list(dict.fromkeys(m["setting"] for m in members))
        summary.append(
            {
                "stage": stage,
                "method": method,
                "budget": budget,
                "keep": kept,
                "seeds": seeded[(stage, method, budget, kept)],  # 0: a reference that needs no seed
                "setting": settings[0] if len(settings) == 1 else " / ".join(settings),
                "loss": mean_spread([m["loss"] for m in members]),
                "gap_closed": mean_spread(closed) if closed else None,
                "expert_equivalents": mean_spread([m["expert_equivalents"] for m in members]),
                "heldout_expert_equivalents": mean_spread([m["heldout_expert_equivalents"] for m in members]),
                "total": mean_spread([m["total"] for m in members]),
            }
        )
    order = {m: i for i, m in enumerate(("full top-k", *METHODS))}
    summary.sort(
        key=lambda r: (
            STAGES.index(r["stage"]),
            r["budget"] if r["budget"] is not None else 99,
            order[r["method"]],
            -(r["keep"] or 0),
        )
    )
    return summary


def summarise_math(rows: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """The math stage per (method, budget): exact match, mean and spread over seeds, and the share of
    the top-m -> full top-k gap in exact match closed, each seed against its own references."""
    mine = [row for row in rows if row["stage"] == MATH]
    score = {(r["method"], r["budget"], r["seed"]): r["exact_match"] for r in mine}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in mine:
        groups.setdefault((row["method"], row["budget"]), []).append(row)
    summary = []
    for (method, budget), members in groups.items():
        closed = []
        if method not in ("full top-k", "top-m"):
            for row in members:
                full, top_m = score.get(("full top-k", top_k, row["seed"])), score.get(("top-m", budget, row["seed"]))
                share = None if full is None or top_m is None else gap_closed(row["exact_match"], top_m, full)
                if share is not None:  # None: a reference missing, or top-m level with full top-k on this seed
                    closed.append(share)
        summary.append(
            {
                "method": method,
                "budget": budget,
                "seeds": len(members),
                "setting": " / ".join(dict.fromkeys(m["setting"] for m in members)),
                "exact_match": mean_spread([m["exact_match"] for m in members]),
                "gap_closed": mean_spread(closed) if closed else None,
                "gap_seeds": len(closed),  # the seeds on which top-m trailed full top-k: a gap to close
            }
        )
    order = {m: i for i, m in enumerate(("full top-k", *METHODS))}
    summary.sort(key=lambda r: (-r["budget"], order[r["method"]]))
    return summary


def table_markdown(results: dict[str, Any]) -> str:
    """The table: one row per stage, method and budget (pruning: per keep), mean ± spread over seeds."""
    lines = [
        f"Seeds: {results['seeds']} (mean ± standard deviation over seeds; full top-k and top-m untuned need none).",
        "",
        "| stage | budget | method | setting | expert-equivalents per token: calibration (held-out) | "
        "total parameters | held-out loss | top-m → top-k gap closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        eq, held = row["expert_equivalents"][0], row["heldout_expert_equivalents"][0]
        loss, closed = row["loss"], row["gap_closed"]
        fewer = f" ({row['seeds']} seeds)" if 0 < row["seeds"] < results["seeds"] else ""  # an interrupted run
        lines.append(
            f"| {row['stage']} | {row['budget'] if row['budget'] is not None else '-'} | {row['method']} | "
            f"{row['setting']} | {eq:.2f} ({held:.2f}) | {row['total'][0] / 1e6:.2f} M | "
            f"{loss[0]:.4f} ± {loss[1]:.4f}{fewer} | {f'{closed[0]:.0%} ± {closed[1]:.0%}' if closed else '-'} |"
        )
    if results.get("math_summary"):
        settings = results["settings"]
        lines += [
            "",
            f"The math task: each method fine-tuned {settings['math_steps']} steps on {settings['math_train']:,} "
            f"generated word problems from its training-free model, then exact match on {settings['math_test']} "
            "held-out problems (greedy, GSM8K scorer).",
            "",
            "| budget | method | setting | seeds | math exact match | top-m → top-k gap closed |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["math_summary"]:
            match, closed = row["exact_match"], row["gap_closed"]
            gap = "-" if closed is None else f"{closed[0]:.0%} ± {closed[1]:.0%}"
            if closed is not None and row["gap_seeds"] < row["seeds"]:
                gap += f" ({row['gap_seeds']} of {row['seeds']} seeds had a gap)"
            lines.append(
                f"| {row['budget']} | {row['method']} | {row['setting']} | {row['seeds']} | "
                f"{match[0]:.1%} ± {match[1]:.1%} | {gap} |"
            )
    return "\n".join(lines) + "\n"


#: How each method is drawn in the plots: (marker, colour).
STYLES = {
    "full top-k": ("*", "black"),
    "top-m": ("s", "grey"),
    "ia3": ("D", "tab:green"),
    "subset": ("^", "tab:blue"),
    "slim": ("o", "tab:orange"),
    "top_p": ("v", "tab:purple"),
    "skip_below": ("<", "tab:pink"),
    "planned": ("P", "tab:olive"),
    "planned, fitted": ("X", "tab:cyan"),
    "planned, slim fitted": ("h", "tab:red"),
    "pruned": ("p", "tab:brown"),
    PRUNED_STAND_INS: ("d", "tab:gray"),
}


def pareto_plots(results: dict[str, Any], active_png: Path, memory_png: Path) -> None:
    """Training-free held-out loss (mean ± spread over seeds) against expert-equivalents per token
    (active routed-expert parameters) and against total parameters in memory, every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if r["stage"] == "training-free"]
    for png, key, scale, label in (
        (
            active_png,
            "expert_equivalents",
            1,
            f"expert-equivalents per token and block (active expert parameters, of {results['top_k']})",
        ),
        (memory_png, "total", 1e6, "total parameters in memory (millions)"),
    ):
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        for method, (marker, color) in STYLES.items():
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key][0])
            if not mine:
                continue
            ax.errorbar(
                [r[key][0] / scale for r in mine],
                [r["loss"][0] for r in mine],
                yerr=[r["loss"][1] for r in mine],
                marker=marker,
                color=color,
                # Against memory every compute-saving method sits at one total: only pruning's keeps make a line.
                linestyle="-" if key == "expert_equivalents" or method.startswith("pruned") else "none",
                linewidth=0.8,
                capsize=2,
                label=method,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss, training-free (lower is better)")
        ax.set_title("Bundled model: every method at matched budgets")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)


BEGIN = "<!-- methods:begin (written by compressed-experts toy methods --report; edit outside) -->"
END = "<!-- methods:end -->"
