"""The planner: each MoE block's compressed-experts setting, chosen on calibration text under a budget.

Blocks differ in how much the model loses when they run fewer full experts, so one ``n_ce`` for
every block spends a budget badly. :func:`plan` measures, for every block and every candidate
setting (``n_ce`` from 1 to ``k - 1`` for each form and ``r`` asked for), the divergence of the
whole model's next-token distribution from the full model's when only that block takes the
setting: the mean over calibration tokens of ``KL(p_full || p_setting)``. It then picks one
setting per block so that the sum of the blocks' divergences is smallest while the mean
expert-equivalents per token and block (``m + n_ce * r / I`` for ``subset``: what
:func:`compressed_experts.active_parameters` reports) stays within the budget: a
multiple-choice knapsack, solved exactly by dynamic programming on costs rounded up to
1/64 of an expert (so the budget is never exceeded).

The sum of single-block divergences is a prediction (blocks interact); the planned model is
then measured whole, beside the best *uniform* setting that fits the same budget, so the
plan reports what it gains over one setting for all blocks, measured, not predicted.

Candidates are measured as converted, with no data fitted: ``subset`` with its neurons chosen
from the weights, ``none`` (top-m); ``slim`` starts equal to ``subset`` and ``ia3`` equal to
``none``, so planning with those forms plans their starting points (fit the planned model
afterwards, :func:`compressed_experts.fit`, as for a uniform one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .architectures import family_of, moe_blocks
from .config import PLAN_FORMAT, CEConfig, setting
from .config import read_plan_file as read_plan
from .convert import check_plan_fits
from .errors import CompressedExpertsError
from .forms import FORMS, get_form
from .layer import CompressedExperts
from .neurons import select_neurons, weight_importance
from .routing import main_slots

__all__ = ["Plan", "PlanConfig", "allocate", "check_plan_fits", "frontier_plot", "plan", "read_plan"]

#: Fewest calibration tokens the planner takes: fewer, and the differences it ranks are noise.
MIN_PLAN_TOKENS = 1024
#: Costs are rounded up to this fraction of an expert for the allocation.
COST_STEP = 1 / 64


@dataclass(frozen=True)
class PlanConfig:
    """What the planner may choose from, and the budget it must meet."""

    budget: str = setting(
        help="Budget: expert-equivalents per token and MoE block (e.g. 4 of top-8), or a share of full top-k (e.g. 50%)."
    )
    forms: str = setting("none,subset", help="Forms the candidates may take, comma-separated.")
    r: str = setting(
        "", help="Neurons of the subset/slim candidates, comma-separated; empty: I/8 and I/4 of the model's experts."
    )
    top_p: str = setting(
        "", help="Per-token top_p candidates, comma-separated (e.g. 0.5,0.7,0.9), each with each form; empty: none."
    )
    skip_below: str = setting(
        "", help="Per-token skip_below candidates, comma-separated (e.g. 0.2,0.4), each with each form; empty: none."
    )
    batch_size: int = setting(8, help="Calibration sequences per forward pass.")

    def __post_init__(self) -> None:
        self.budget_value()  # raises on a malformed budget
        names = self.form_names()
        if not names:
            raise CompressedExpertsError("forms is empty: name at least one form", settings=("forms",))
        for name in names:
            if name not in FORMS:
                raise CompressedExpertsError(
                    f"unknown form {name!r} in forms; choose from {', '.join(FORMS)}", settings=("forms",)
                )
        for r in self.neuron_counts() or ():
            if r < 1:
                raise CompressedExpertsError(f"r values must be 1 or more, got {r}", settings=("r",))
        self.rules()  # raises on a malformed or out-of-range value
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CompressedExpertsError(
                f"batch_size must be a whole number, 1 or more; got {self.batch_size!r}", settings=("batch_size",)
            )

    def form_names(self) -> list[str]:
        return [f.strip() for f in self.forms.split(",") if f.strip()]

    def rules(self) -> list[dict[str, float]]:
        """The per-token rules asked for, as CEConfig keywords (``{"top_p": 0.7}``), each checked."""
        out = []
        for name in ("top_p", "skip_below"):
            for text in str(getattr(self, name)).split(","):
                if not text.strip():
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise CompressedExpertsError(
                        f"{name} must be numbers separated by commas, got {getattr(self, name)!r}", settings=(name,)
                    ) from None
                CEConfig(form=FORMS[0], **{name: value})  # the rule's own range check and message
                out.append({name: value})
        return out

    def neuron_counts(self) -> list[int] | None:
        """The ``r`` values asked for, or None for the default (I/8 and I/4)."""
        if not str(self.r).strip():
            return None
        try:
            return [int(v) for v in str(self.r).split(",") if v.strip()]
        except ValueError:
            raise CompressedExpertsError(
                f"r must be whole numbers separated by commas, got {self.r!r}", settings=("r",)
            ) from None

    def budget_value(self) -> tuple[float, bool]:
        """(value, is_share): ``"50%"`` is (0.5, True), ``"4"`` is (4.0, False)."""
        text = str(self.budget).strip()
        share = text.endswith("%")
        try:
            value = float(text.removesuffix("%"))
        except ValueError:
            raise CompressedExpertsError(
                f"budget must be a number of expert-equivalents (e.g. 4) or a share of full top-k (e.g. 50%), "
                f"got {self.budget!r}",
                settings=("budget",),
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise CompressedExpertsError(f"budget must be above 0, got {self.budget!r}", settings=("budget",))
        return (value / 100, True) if share else (value, False)

    def expert_budget(self, top_k: int) -> float:
        """The budget in expert-equivalents per token and block for a model of ``top_k``."""
        value, share = self.budget_value()
        return value * top_k if share else value


@dataclass
class Plan:
    """A setting per MoE block, what it was predicted and measured to cost, and the comparison."""

    budget: float  # expert-equivalents per token and block
    top_k: int
    num_experts: int
    blocks: list[str]
    layers: list[CEConfig]
    layer_costs: list[float]  # expert-equivalents of each block's setting
    layer_divergences: list[float]  # measured with that block alone changed
    predicted_divergence: float  # their sum
    measured_divergence: float | None = None  # the planned model, all blocks changed
    uniform: dict[str, Any] | None = None  # the best single setting that fits the budget
    frontier: list[dict[str, Any]] = field(default_factory=list)
    calibration_tokens: int = 0
    full_loss: float | None = None  # held-out loss of full top-k, the frontier's floor

    @property
    def expert_equivalents(self) -> float:
        return sum(self.layer_costs) / len(self.layer_costs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "budget": self.budget,
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "expert_equivalents": self.expert_equivalents,
            "predicted_divergence": self.predicted_divergence,
            "measured_divergence": self.measured_divergence,
            "uniform": self.uniform,
            "calibration_tokens": self.calibration_tokens,
            "full_loss": self.full_loss,
            "layers": [
                {"block": b, **c.to_dict(), "expert_equivalents": cost, "divergence": d}
                for b, c, cost, d in zip(self.blocks, self.layers, self.layer_costs, self.layer_divergences)
            ],
            "frontier": self.frontier,
        }

    def save(self, path: str | Path) -> None:
        from .checkpoint import write_atomic

        write_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")


def plan(
    model: PreTrainedModel,
    calibration: torch.Tensor,
    config: PlanConfig,
    frontier: Sequence[float] | None = (),
    heldout: torch.Tensor | None = None,
    progress: bool = False,
) -> Plan:
    """Choose each MoE block's setting of the plain ``model`` on ``calibration`` ``[n, seq]`` token ids.

    ``frontier``: other budgets (expert-equivalents) at which to plan and measure too, planned
    against the best uniform setting (divergence, and held-out loss on ``heldout`` if given), for
    the frontier plot; None: every whole number of experts from the cheapest candidate's cost to ``k - 1``. The model is left as it was (its experts' neurons may be reordered, which
    changes nothing it computes).
    """
    family = family_of(model)
    blocks = list(moe_blocks(model, family))
    if not blocks:
        raise CompressedExpertsError("this model has no MoE blocks to plan")
    if any(isinstance(block.experts, CompressedExperts) for _, block in blocks):
        raise CompressedExpertsError("plan a plain model: this one already has compressed experts; load the original")
    top_k = model.config.num_experts_per_tok
    budget = config.expert_budget(top_k)
    candidates = _candidates(blocks, top_k, config)
    costs = [[c.cost for c in per_block] for per_block in candidates]
    _check_budget(budget, costs, top_k, config.budget)
    if frontier is None:
        cheapest = sum(min(c) for c in costs) / len(costs)
        frontier = [n for n in range(1, top_k) if n >= cheapest - 1e-9]
    for other in frontier:
        _check_budget(other, costs, top_k, str(other))
    if calibration.numel() < MIN_PLAN_TOKENS:
        raise CompressedExpertsError(
            f"calibration text too short to plan on: {calibration.numel()} tokens, at least {MIN_PLAN_TOKENS} needed",
            settings=("tokens",),
        )
    batches = calibration.split(config.batch_size)
    measure = _Measure(model, blocks, batches, progress)
    if config.rules():
        measure.cost_rules(candidates, top_k)
    divergences = measure.single_blocks(candidates)
    result = _allocated(blocks, candidates, divergences, budget, top_k)
    result.calibration_tokens = calibration.numel()
    result.measured_divergence, result.uniform = measure.against_uniform(result, candidates, divergences)
    if heldout is not None:
        result.full_loss = measure.loss(heldout, [None] * len(blocks))
    for point in sorted({*frontier, budget}):
        planned = result if point == budget else _allocated(blocks, candidates, divergences, point, top_k)
        measured, uniform = (
            (result.measured_divergence, result.uniform)
            if point == budget
            else measure.against_uniform(planned, candidates, divergences)
        )
        row = {
            "budget": point,
            "planned": planned.expert_equivalents,
            "planned_divergence": measured,
            # The plan at this point, so that it can be applied (convert(model, [CEConfig.from_dict(...)])).
            "layers": [config.to_dict() for config in planned.layers],
            **_prefixed(uniform),
        }
        if heldout is not None:
            row["planned_loss"] = measure.loss(heldout, planned.layers)
            if uniform is not None:
                row["uniform_loss"] = measure.loss(heldout, [CEConfig.from_dict(uniform["setting"])] * len(blocks))
        result.frontier.append(row)
    return result


def _prefixed(uniform: dict[str, Any] | None) -> dict[str, Any]:
    if uniform is None:
        return {"uniform": None}
    return {
        "uniform": uniform["setting"],
        "uniform_expert_equivalents": uniform["expert_equivalents"],
        "uniform_divergence": uniform["measured_divergence"],
    }


@dataclass
class _Candidate:
    config: CEConfig
    cost: float  # expert-equivalents per token in its block (a per-token rule's: measured)
    aux: float  # what one auxiliary expert costs, in experts


def _candidates(blocks, top_k: int, config: PlanConfig) -> list[list[_Candidate]]:
    """Every block's candidates: full top-k first, then each n_ce for each form (and r)."""
    out = []
    for _, block in blocks:
        experts = block.experts
        intermediate = experts.down_proj.shape[-1]
        per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        neuron_counts = config.neuron_counts() or sorted({max(1, intermediate // 8), max(1, intermediate // 4)})
        bad = [r for r in neuron_counts if r > intermediate]
        if bad:
            raise CompressedExpertsError(
                f"r {bad[0]} is more neurons than this model's experts have ({intermediate})", settings=("r",)
            )
        per_block = [_Candidate(CEConfig(0), float(top_k), 0.0)]
        for name in config.form_names():
            form = get_form(name)
            for r in neuron_counts if form.takes_r else [None]:
                aux = _auxiliary_cost(form, experts, r) / per_expert
                for n_ce in range(1, top_k):
                    per_block.append(_Candidate(CEConfig(n_ce, name, r), top_k - n_ce + n_ce * aux, aux))
                # A per-token rule's cost is known once its main experts are counted on the text
                # (_Measure.main_counts); until then, its floor: one main expert per token.
                for rule in config.rules():
                    per_block.append(_Candidate(CEConfig(form=name, r=r, **rule), 1 + (top_k - 1) * aux, aux))
        out.append(per_block)
    return out


def _auxiliary_cost(form, experts, r: int | None) -> int:
    """Parameters one auxiliary expert of ``form`` touches: the form reads only a block's sizes, so
    they are handed over without building the block (slim's would allocate its MLPs)."""
    sizes = SimpleNamespace(
        hidden_dim=experts.gate_up_proj.shape[-1], intermediate_dim=experts.down_proj.shape[-1], r=r
    )
    return form.auxiliary_cost(sizes)


def _check_budget(budget: float, costs: list[list[float]], top_k: int, given: str) -> None:
    cheapest = sum(min(c) for c in costs) / len(costs)
    if budget < cheapest - 1e-9:
        raise CompressedExpertsError(
            f"budget {given} is below what any candidate reaches ({cheapest:.2f} expert-equivalents per token: "
            f"one full expert per token in every block): raise it",
            settings=("budget",),
        )
    if budget > top_k + 1e-9:
        raise CompressedExpertsError(
            f"budget {given} is above full top-k ({top_k} expert-equivalents per token): nothing to plan",
            settings=("budget",),
        )


def _allocated(blocks, candidates, divergences: list[list[float]], budget: float, top_k: int) -> Plan:
    """The per-block choice of least summed divergence whose mean cost is within ``budget``."""
    units = [[math.ceil(c.cost / COST_STEP - 1e-9) for c in per_block] for per_block in candidates]
    capacity = math.floor(budget * len(blocks) / COST_STEP + 1e-9)
    choice = allocate(divergences, units, capacity)
    if choice is None:  # _check_budget makes this unreachable short of rounding; say so rather than guess
        raise CompressedExpertsError(f"no setting per block fits a budget of {budget:.3f} expert-equivalents")
    chosen = [candidates[b][c] for b, c in enumerate(choice)]
    layer_div = [divergences[b][c] for b, c in enumerate(choice)]
    return Plan(
        budget=budget,
        top_k=top_k,
        num_experts=blocks[0][1].experts.gate_up_proj.shape[0],
        blocks=[name for name, _ in blocks],
        layers=[c.config for c in chosen],
        layer_costs=[c.cost for c in chosen],
        layer_divergences=layer_div,
        predicted_divergence=sum(layer_div),
    )


def allocate(values: list[list[float]], costs: list[list[int]], capacity: int) -> list[int] | None:
    """Indices, one per group, of least summed value with summed integer cost at most ``capacity``
    (None if none fits): the multiple-choice knapsack by dynamic programming over cost."""
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for value, cost in zip(values, costs):
        new = torch.full_like(best, inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.long)
        for index, (v, c) in enumerate(zip(value, cost)):
            if c > capacity:
                continue
            shifted = torch.full_like(best, inf)
            shifted[c:] = best[: capacity + 1 - c] + v
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.tensor(index), pick)
        best = new
        picks.append(pick)
    if not torch.isfinite(best).any():
        return None
    spent = int(best.argmin())
    choice = []
    for group in reversed(range(len(values))):
        index = int(picks[group][spent])
        choice.append(index)
        spent -= costs[group][index]
    return choice[::-1]


class _Measure:
    """Divergences of the model's next-token distribution from the full model's on calibration batches."""

    def __init__(self, model, blocks, batches, progress: bool) -> None:
        self.model, self.blocks, self.batches, self.progress = model, blocks, batches, progress
        self.original = [block.experts for _, block in blocks]
        self.stand_ins: dict[tuple[int, str, int | None], CompressedExperts] = {}
        self.device = next(model.parameters()).device

    def _stand_in(self, index: int, config: CEConfig) -> CompressedExperts:
        """Block ``index``'s compressed experts of ``config`` (one module per form and r; n_ce set per use)."""
        key = (index, config.form, config.r)
        if key not in self.stand_ins:
            layer = CompressedExperts(self.original[index], config.n_ce, config.form, config.r)
            if layer.form_spec.selects_neurons:
                select_neurons(layer, weight_importance(layer))
            self.stand_ins[key] = layer
        layer = self.stand_ins[key]
        layer.n_ce, layer.top_p, layer.skip_below = config.n_ce, config.top_p, config.skip_below
        return layer

    @torch.no_grad()
    def cost_rules(self, candidates: list[list[_Candidate]], top_k: int) -> None:
        """Each per-token rule candidate's cost, from the number of main experts it keeps on the
        calibration text in its block: ``m + (k - m) * aux`` averaged over tokens. A block's
        routing is the full model's here (only that block changes when it is measured)."""
        sums = [[0.0] * len(per_block) for per_block in candidates]
        tokens = 0

        def count(index: int):
            def hook(module, args, kwargs, output) -> None:
                given = list(args) + [
                    kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs
                ]
                weights = given[2]
                ordered = weights.sort(dim=-1, descending=True).values
                for c_index, candidate in enumerate(candidates[index]):
                    config = candidate.config
                    if config.dynamic:
                        mains = main_slots(ordered, config.top_p, config.skip_below).sum()
                        sums[index][c_index] += float(mains)

            return hook

        handles = [experts.register_forward_hook(count(i), with_kwargs=True) for i, experts in enumerate(self.original)]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.batches:
                self.model(batch.to(self.device))
                tokens += batch.numel()
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
        for index, per_block in enumerate(candidates):
            for c_index, candidate in enumerate(per_block):
                if candidate.config.dynamic:
                    mains = sums[index][c_index] / tokens
                    candidate.cost = mains + (top_k - mains) * candidate.aux

    def _use(self, configs: Sequence[CEConfig | None]) -> None:
        for index, ((_, block), config) in enumerate(zip(self.blocks, configs)):
            block.experts = (
                self.original[index] if config is None or config.n_ce == 0 else self._stand_in(index, config)
            )

    def _log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(batch.to(self.device)).logits.float(), dim=-1)

    @torch.no_grad()
    def _divergences(self, settings: list[list[CEConfig | None]], what: str) -> list[float]:
        """Mean KL(full || setting) per token, for each whole-model setting (a config per block)."""
        was_training = self.model.training
        self.model.eval()
        sums = [0.0] * len(settings)
        tokens = 0
        bar = tqdm(total=len(self.batches) * len(settings), desc=what, disable=not self.progress)
        try:
            for batch in self.batches:
                self._use([None] * len(self.blocks))
                reference = self._log_probs(batch)
                probs = reference.exp()
                for index, configs in enumerate(settings):
                    self._use(configs)
                    sums[index] += float((probs * (reference - self._log_probs(batch))).sum())
                    bar.update()
                tokens += batch.numel()
        finally:
            self._use([None] * len(self.blocks))
            self.model.train(was_training)
            bar.close()
        return [s / tokens for s in sums]

    def single_blocks(self, candidates: list[list[_Candidate]]) -> list[list[float]]:
        """[block][candidate]: the divergence with that block alone on that candidate (full top-k: 0)."""
        settings, where = [], []
        for index, per_block in enumerate(candidates):
            for c_index, candidate in enumerate(per_block[1:], start=1):
                configs: list[CEConfig | None] = [None] * len(self.blocks)
                configs[index] = candidate.config
                settings.append(configs)
                where.append((index, c_index))
        measured = self._divergences(settings, "measuring each block's candidates")
        out = [[0.0] * len(per_block) for per_block in candidates]
        for (index, c_index), value in zip(where, measured):
            out[index][c_index] = max(value, 0.0)  # a KL; rounding can leave -1e-9
        return out

    def against_uniform(self, planned: Plan, candidates, divergences) -> tuple[float, dict[str, Any] | None]:
        """The planned model's measured divergence, and the best uniform setting within its budget
        (least predicted divergence among those that fit), measured the same way."""
        fits = [
            i
            for i in range(len(candidates[0]))
            if sum(per_block[i].cost for per_block in candidates) / len(candidates) <= planned.budget + 1e-9
        ]
        uniform = min(fits, key=lambda i: sum(d[i] for d in divergences)) if fits else None
        settings = [planned.layers]
        if uniform is not None:
            settings.append([per_block[uniform].config for per_block in candidates])
        measured = self._divergences(settings, f"measuring the plan at {planned.budget:g}")
        if uniform is None:
            return measured[0], None
        cost = sum(per_block[uniform].cost for per_block in candidates) / len(candidates)
        return measured[0], {
            "setting": candidates[0][uniform].config.to_dict(),
            "expert_equivalents": cost,
            "predicted_divergence": sum(d[uniform] for d in divergences),
            "measured_divergence": measured[1],
        }

    @torch.no_grad()
    def loss(self, heldout: torch.Tensor, configs: Sequence[CEConfig | None]) -> float:
        """Mean next-token loss on ``heldout`` with each block on its setting."""
        self._use(configs)
        try:
            total, count = 0.0, 0
            for batch in heldout.split(len(self.batches[0])):
                batch = batch.to(self.device)
                logits = self.model(batch).logits[:, :-1].float()
                total += float(
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                )
                count += batch[:, 1:].numel()
        finally:
            self._use([None] * len(self.blocks))
        return total / count


def frontier_plot(result: Plan, path: str | Path, say: Callable[[str], None] = lambda _: None) -> None:
    """Divergence (and held-out loss, if measured) against expert-equivalents: planned and uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.frontier if r.get("planned_divergence") is not None]
    with_loss = any("planned_loss" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(11 if with_loss else 6, 4), squeeze=False)
    panels = [("divergence", "KL from full top-k (nats/token)")] + ([("loss", "held-out loss")] if with_loss else [])
    for ax, (key, label) in zip(axes[0], panels):
        planned = [(r["planned"], r[f"planned_{key}"]) for r in rows if f"planned_{key}" in r]
        uniform = [
            (r["uniform_expert_equivalents"], r[f"uniform_{key}"]) for r in rows if r.get(f"uniform_{key}") is not None
        ]
        ax.plot(*zip(*sorted(planned)), "o-", label="planned per block")
        if uniform:
            ax.plot(*zip(*sorted(uniform)), "s--", label="best uniform setting")
        if key == "loss" and result.full_loss is not None:
            ax.axhline(result.full_loss, color="black", lw=0.8, label=f"full top-{result.top_k}")
        ax.axvline(result.budget, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"expert-equivalents per token and block (of {result.top_k})")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    say(f"wrote {path}")
