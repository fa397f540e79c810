"""Expert pruning for a domain: rank each MoE block's experts on calibration text and remove the lowest.

What :func:`prune` does, in order:

1. runs the calibration text through the model once and, for every MoE block, sums per expert
   its ``frequency`` (how often a token routes to it), its routing ``mass`` (the sum of the
   routing weights the block hands to it) and its ``saliency`` (routing weight times the norm of
   the expert's output, summed over the tokens routed to it: what the expert actually adds to
   the block's output, so what removing it takes away; computed only when asked for, as it runs
   every routed expert once more);
2. keeps, in every block, the ``keep`` experts that score highest on ``criterion`` (default
   ``mass``: as good as saliency on the bundled model and free, see docs/pruning.md) and removes the rest physically: the rows of the router's weight and the slices
   of ``gate_up_proj`` / ``down_proj`` of the removed experts are dropped, and the model's
   config says ``keep`` experts. The kept experts keep their relative order.

The result is an ordinary, smaller MoE of the same family: it saves and loads with
``save_pretrained`` / transformers' own ``from_pretrained`` (and :func:`compressed_experts.from_pretrained`),
can be converted to compressed experts and fitted like any other model, and takes less memory.

With ``stand_in`` (``ia3`` or ``slim``) the removed experts leave compressed experts behind instead:
the router keeps all its rows and still picks among every expert, the kept experts are moved to
the lowest ids (``0 .. keep-1``, in their order; the removed ones follow), and the model is
converted under the rule ``kept_experts = keep`` (a token runs its kept experts in full and gets
the removed ones' compressed experts, see :class:`~compressed_experts.layer.CompressedExperts`),
the compressed experts fitted on the calibration text (:func:`compressed_experts.fit`, against the
unpruned block), and only then are the removed experts' weights dropped. It saves and loads with
:func:`compressed_experts.from_pretrained` as a compressed-experts checkpoint (not by transformers
alone: its router picks experts whose weights are gone).

Routing after pruning is exactly the original router's with the removed experts' logits at
``-inf`` (they can never be picked): a softmax router (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE)
then normalises over the kept experts, and renormalised top-k weights are unchanged;
PhiMoE's sparsemixer picks and weighs among the kept experts as it would with the others at
``-inf``. DeepSeek-V3 routes in fixed groups of contiguous ids (a group's score is the sum of its
two best experts' scores, only the ``topk_group`` best groups are searched), with a score-correction
bias added after the sigmoid: it is pruned **group-balanced**, the same number of experts kept in
every group (the best of each group, so that the groups stay contiguous under the new ids), the bias
entries dropped with their rows. Then each group's score is its two best kept experts', as the
original router's with the removed experts' scores at ``-inf``; each group must keep two experts,
and the searched groups at least top-k between them.

Each block keeps the same number of experts (the config has one expert count for all blocks,
which is what lets the pruned model load natively).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .architectures import family_of, moe_blocks
from .config import CEConfig, setting
from .convert import convert
from .errors import CompressedExpertsError, UnsupportedModelError
from .fit import FitConfig, fit
from .forms import REGISTRY
from .layer import CompressedExperts

#: How experts can be ranked; the first is the default.
CRITERIA = ("mass", "saliency", "frequency")
#: Families whose routing stays exact for the kept experts when the removed ones' rows are dropped
#: (DeepSeek-V3 when as many are kept in every routing group: :func:`routing_groups`).
PRUNABLE = ("OLMoE", "Mixtral", "Qwen2-MoE", "Qwen3-MoE", "PhiMoE", "DeepSeek-V3")
#: Calibration must route at least this many tokens to each expert on average (``tokens * k / E``):
#: fewer, and the ranking of the experts is mostly noise.
MIN_ROUTINGS_PER_EXPERT = 32
#: Forms that can stand in for removed experts: those with parameters to fit (``none`` would leave a
#: token routed to a removed expert with nothing, which pruning without stand-ins does better: its
#: router renormalises over the kept experts; ``subset`` runs the removed experts' own weights).
STAND_INS = tuple(name for name, form in REGISTRY.items() if form.stands_in and form.parameters)
#: Config fields that hold the number of routed experts, by family.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class PruneConfig:
    """How :func:`prune` ranks and removes experts; refused when built if it cannot work."""

    keep: int = setting(help="Routed experts kept in every MoE block (at least top-k, fewer than there are).")
    criterion: str = setting(
        "mass",
        "How experts are ranked on the calibration text: mass (routing weight, summed), saliency "
        "(routing weight x expert output norm, summed) or frequency (tokens routed).",
    )
    batch_size: int = setting(8, "Calibration sequences run through the model at a time.")
    stand_in: str | None = setting(
        None,
        f"Stand in for the removed experts with compressed experts of this form ({', '.join(STAND_INS)}), fitted on "
        "the calibration text: the router still picks every expert, and a token routed to a removed one gets its "
        "compressed expert. Default: no stand-ins (the router can no longer pick the removed experts).",
    )
    r: int | None = setting(None, "Neurons of each slim stand-in; default an eighth of the expert's.")
    fit_steps: int = setting(200, "Adam steps per MoE block fitting the stand-ins.")

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise CompressedExpertsError(f"keep must be a whole number of experts, got {keep!r}", settings=("keep",))
        if keep < 1:
            raise CompressedExpertsError(
                f"keep={keep} would prune every expert of each MoE block: keep at least top-k of them",
                settings=("keep",),
            )
        if self.criterion not in CRITERIA:
            raise CompressedExpertsError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}", settings=("criterion",)
            )
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise CompressedExpertsError(
                f"batch_size must be a whole number, at least 1; got {size!r}", settings=("batch_size",)
            )
        if self.stand_in is None:
            if self.r is not None:
                raise CompressedExpertsError(
                    "r sets the slim stand-ins' neurons: give stand_in='slim' too", settings=("r",)
                )
            return
        if self.stand_in not in STAND_INS:
            raise CompressedExpertsError(
                f"stand_in must be one of {', '.join(STAND_INS)} (compressed experts fitted to stand in for the removed "
                f"experts), got {self.stand_in!r}; leave it out to prune without stand-ins",
                settings=("stand_in",),
            )
        _ = self.stand_in_config  # r against the form: refused here, before any work
        steps = self.fit_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CompressedExpertsError(
                f"fit_steps must be a whole number, 0 or more; got {steps!r}", settings=("fit_steps",)
            )

    @property
    def stand_in_config(self) -> CEConfig:
        """The compressed-experts settings of the pruned model's blocks (with ``stand_in``)."""
        return CEConfig(form=self.stand_in, r=self.r, kept_experts=self.keep)


def check_prunable(model: nn.Module, keep: int) -> tuple[int, int]:
    """Refuse a model or a ``keep`` that pruning cannot serve; return (experts per block, top-k).

    Works on a model built on the meta device, so the command line checks before reading weights.
    """
    if not isinstance(model, PreTrainedModel):
        raise CompressedExpertsError(f"prune takes a loaded transformers model, got {type(model).__name__}")
    family = family_of(model)
    if family.name not in PRUNABLE:
        raise UnsupportedModelError(f"pruning {family.name} is not supported; prunable families: {', '.join(PRUNABLE)}")
    blocks = list(moe_blocks(model, family))
    if not blocks:
        raise UnsupportedModelError(f"found no {family.block_class} in this {family.name} model")
    if any(isinstance(block.experts, CompressedExperts) for _, block in blocks):
        raise CompressedExpertsError(
            "this model has compressed experts: prune the plain model, then convert the pruned one (n_ce, form)"
        )
    experts = blocks[0][1].experts.gate_up_proj.shape[0]
    top_k = model.config.num_experts_per_tok
    if keep < 1:
        raise CompressedExpertsError(
            f"keep={keep} would prune every expert of each MoE block: keep at least top-k ({top_k})",
            settings=("keep",),
        )
    if keep < top_k:
        raise CompressedExpertsError(
            f"keep={keep} is fewer than the {top_k} experts the router picks per token: keep {top_k} to "
            f"{experts - 1} of the {experts} experts",
            settings=("keep",),
        )
    if keep >= experts:
        raise CompressedExpertsError(
            f"keep={keep} prunes nothing: the model has {experts} experts per block; keep {top_k} to {experts - 1}",
            settings=("keep",),
        )
    groups, searched = routing_groups(model)
    if groups > 1:
        per = keep // groups
        fits = [k for k in range(2 * groups, experts, groups) if searched * (k // groups) >= top_k]
        if keep % groups or per < 2 or searched * per < top_k:
            raise CompressedExpertsError(
                f"keep={keep} does not fit {family.name}'s grouped routing ({experts} experts in {groups} groups, "
                f"the best {searched} groups searched for top-{top_k}): every group keeps as many experts, at "
                f"least 2 (a group's score is its two best), and the searched groups at least {top_k} between "
                f"them; keep one of {', '.join(map(str, fits)) or 'none: this model cannot be pruned'}",
                settings=("keep",),
            )
    return experts, top_k


def routing_groups(model: nn.Module) -> tuple[int, int]:
    """(routing groups, groups searched per token) of a grouped router (DeepSeek-V3: ``n_group``,
    ``topk_group``); (1, 1) for a router that picks among all experts at once."""
    groups = getattr(model.config, "n_group", None) or 1
    return groups, (getattr(model.config, "topk_group", None) or 1) if groups > 1 else 1


def check_stand_in(model: nn.Module, config: PruneConfig) -> None:
    """Refuse stand-ins whose ``r`` does not fit ``model``'s experts (works on the meta device, so the
    command line checks before reading weights)."""
    if config.stand_in is None:
        return
    if routing_groups(model)[0] > 1:
        raise UnsupportedModelError(
            f"stand-ins for {family_of(model).name} are not supported: they need the kept experts renumbered "
            "first, which would move experts between its routing groups; prune it without a stand-in"
        )
    config.stand_in_config.resolved(_intermediate(model))


def min_calibration_tokens(experts: int, top_k: int) -> int:
    """The fewest calibration tokens that route :data:`MIN_ROUTINGS_PER_EXPERT` tokens to each expert on average."""
    return math.ceil(MIN_ROUTINGS_PER_EXPERT * experts / top_k)


def check_calibration(blocks: Any, experts: int, top_k: int) -> None:
    """Refuse calibration token blocks that are not ``[n, seq_len]`` ids or are too few to rank the experts."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.numel() == 0:
        raise CompressedExpertsError("calibration blocks must be a non-empty [n, seq_len] tensor of token ids")
    least = min_calibration_tokens(experts, top_k)
    if blocks.numel() < least:
        raise CompressedExpertsError(
            f"the calibration text gives {blocks.numel()} tokens, too few to rank {experts} experts: pruning needs "
            f"at least {least} ({MIN_ROUTINGS_PER_EXPERT} routed tokens per expert on average at top-{top_k}); "
            f"give more text",
            settings=("tokens",),
        )


class _Scores:
    """Per-expert sums of one block's routing on the calibration text."""

    def __init__(self, experts: nn.Module, saliency: bool) -> None:
        count = experts.gate_up_proj.shape[0]
        self.experts = experts
        self.sums = {c: torch.zeros(count, dtype=torch.float64) for c in CRITERIA if saliency or c != "saliency"}

    @torch.no_grad()
    def __call__(self, module, args, kwargs, output) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index, weights = values[:3]
        experts = self.experts
        flat_index, flat_weights = index.reshape(-1), weights.reshape(-1).float()
        tokens = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        count = experts.gate_up_proj.shape[0]
        self.sums["frequency"] += torch.bincount(flat_index, minlength=count).double().cpu()
        self.sums["mass"] += (
            torch.zeros(count, device=index.device).index_add_(0, flat_index, flat_weights).double().cpu()
        )
        if "saliency" not in self.sums:
            return
        saliency = torch.zeros(count, dtype=torch.float32, device=index.device)
        for expert in flat_index.unique().tolist():
            rows = flat_index == expert
            x = hidden[tokens[rows]]
            gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
            out = nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
            saliency[expert] = (flat_weights[rows] * out.float().norm(dim=-1)).sum()
        self.sums["saliency"] += saliency.double().cpu()


@torch.no_grad()
def expert_scores(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    batch_size: int = 8,
    *,
    saliency: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{block name: {criterion: [E] sums}}`` over the calibration token ``blocks``, every criterion at
    once (``saliency`` only when asked for: it runs every routed expert a second time).

    One pass through the unpruned model (eval mode, no cache); the inputs each block's experts
    receive are the original model's, so every block is ranked on the same footing.
    """
    family = family_of(model)
    scorers, handles = {}, []
    for name, block in moe_blocks(model, family):
        scorers[name] = _Scores(block.experts, saliency)
        handles.append(block.experts.register_forward_hook(scorers[name], with_kwargs=True))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        starts = range(0, blocks.shape[0], batch_size)
        for start in tqdm(starts, desc="ranking experts", unit="batch", disable=not progress, dynamic_ncols=True):
            model(blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: scorer.sums for name, scorer in scorers.items()}


def kept_experts(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """The ids of the ``keep`` highest-scoring experts, in id order (ties: the lower id is kept); with
    ``groups`` routing groups of contiguous ids, the ``keep / groups`` highest of each group."""
    size, per = len(scores) // groups, keep // groups
    kept = []
    for start in range(0, len(scores), size):
        order = torch.argsort(-scores[start : start + size], stable=True)
        kept += (order[:per] + start).tolist()
    return sorted(kept)


def _checked_kept(model: PreTrainedModel, kept: dict[str, list[int]]) -> tuple[dict[str, nn.Module], int, int]:
    """(MoE blocks by name, experts per block, experts kept), once ``kept`` is checked to name the
    same number of distinct expert ids for every block."""
    blocks = dict(moe_blocks(model, family_of(model)))
    if set(kept) != set(blocks):
        raise CompressedExpertsError("pruning needs the experts to keep for every MoE block, by name")
    sizes = {len(ids) for ids in kept.values()}
    if len(sizes) != 1:
        raise CompressedExpertsError("every MoE block must keep the same number of experts (one config for all)")
    keep = sizes.pop()
    experts = check_prunable(model, keep)[0]
    groups = routing_groups(model)[0]
    for name, ids in kept.items():
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) and 0 <= i < experts for i in ids):
            raise CompressedExpertsError(f"{name}: experts to keep must be distinct ids below {experts}, got {ids}")
        per_group = [sum(i * groups // experts == g for i in ids) for g in range(groups)]
        if groups > 1 and (len(set(per_group)) > 1 or ids != sorted(ids)):
            raise CompressedExpertsError(
                f"{name}: a grouped router needs the same number of experts kept in each of its {groups} groups, "
                f"in id order (so that the groups stay contiguous); got {per_group} per group"
            )
    return blocks, experts, keep


@torch.no_grad()
def _take_experts(model: PreTrainedModel, blocks: dict[str, nn.Module], ids: dict[str, list[int]]) -> None:
    """Each block's experts become ``ids[block name]``, in that order: the router's rows and the
    expert weights move together (so routing picks the same experts, now under their new ids)."""
    router_attr = family_of(model).router_attr
    for name, block in blocks.items():
        index = torch.tensor(ids[name], device=block.experts.gate_up_proj.device)
        router = getattr(block, router_attr)
        for module, attr in ((block.experts, "gate_up_proj"), (block.experts, "down_proj"), (router, "weight")):
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(old.detach().index_select(0, index), requires_grad=old.requires_grad))
        bias = getattr(router, "e_score_correction_bias", None)  # DeepSeek-V3: one entry per expert, a buffer
        if bias is not None:
            router.e_score_correction_bias = bias.index_select(0, index)
        if isinstance(router, nn.Linear):
            router.out_features = len(ids[name])


def kept_first(model: PreTrainedModel, kept: dict[str, list[int]]) -> dict[str, list[int]]:
    """Renumber each MoE block's experts, in place, so that ``kept[block name]`` come first (ids
    ``0..keep-1`` in the order given) and the others follow in id order; what the model computes is
    unchanged. Returns the others (old ids, in their new order): the experts that stand-ins replace."""
    blocks, experts, _ = _checked_kept(model, kept)
    if routing_groups(model)[0] > 1:
        raise UnsupportedModelError(
            f"{family_of(model).name}'s experts sit in routing groups of contiguous ids: renumbering the kept "
            "ones first would move experts between groups and change what the model computes"
        )
    others = {name: sorted(set(range(experts)) - set(ids)) for name, ids in kept.items()}
    _take_experts(model, blocks, {name: kept[name] + others[name] for name in blocks})
    return others


def remove_experts(model: PreTrainedModel, kept: dict[str, list[int]]) -> PreTrainedModel:
    """Keep only the experts ``kept[block name]`` (ids, as many in every block) of each MoE block, in place.

    Drops the removed experts' router rows and weights and sets the config's expert count; the
    kept experts are renumbered ``0..keep-1`` in the order given. Returns ``model``.
    """
    blocks, experts, keep = _checked_kept(model, kept)
    _take_experts(model, blocks, kept)
    # Every module attribute that holds the expert count (routers, experts, blocks, the LM's aux loss).
    for module in model.modules():
        for attr in _EXPERT_COUNT_FIELDS:
            if getattr(module, attr, None) == experts and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, keep)
    config = model.config
    for attr in _EXPERT_COUNT_FIELDS:
        if getattr(config, attr, None) == experts:
            setattr(config, attr, keep)
    return model


def prune(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    config: PruneConfig | None = None,
    *,
    progress: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Remove, in place, the experts of every MoE block that the calibration text uses least.

    The settings are a :class:`PruneConfig` or its fields as keywords (``prune(model, blocks,
    keep=32)``). ``blocks`` is ``[n, seq_len]`` calibration token ids
    (:func:`compressed_experts.fit.calibration_blocks`). Everything is checked before the model runs.
    Returns a report: the criterion, the expert counts before and after, and per block the
    kept ids (old numbering, in new order) and the share of each measured criterion's total they carry.
    """
    if config is not None and settings:
        raise CompressedExpertsError("give prune a PruneConfig or its settings as keywords, not both")
    if config is not None and not isinstance(config, PruneConfig):
        raise CompressedExpertsError(f"config must be a PruneConfig, got {type(config).__name__}")
    try:
        config = config or PruneConfig(**settings)
    except TypeError as err:  # an unknown or missing keyword
        raise CompressedExpertsError(f"prune: {err}; its settings are those of PruneConfig") from None
    experts, top_k = check_prunable(model, config.keep)
    check_stand_in(model, config)
    check_calibration(blocks, experts, top_k)
    scores = expert_scores(model, blocks, config.batch_size, saliency=config.criterion == "saliency", progress=progress)
    groups = routing_groups(model)[0]
    kept = {name: kept_experts(sums[config.criterion], config.keep, groups) for name, sums in scores.items()}
    report: dict[str, Any] = {
        "criterion": config.criterion,
        "experts_before": experts,
        "experts_after": config.keep,
        "top_k": top_k,
        "calibration_tokens": blocks.numel(),
        "blocks": [],
    }
    for name, ids in kept.items():
        sums = scores[name]
        share = {f"{c}_kept": (sums[c][ids].sum() / sums[c].sum().clamp_min(1e-30)).item() for c in sums}
        report["blocks"].append({"block": name, "kept": ids, **share})
    if config.stand_in is None:
        remove_experts(model, kept)
        return report
    others = kept_first(model, kept)
    for row in report["blocks"]:
        row["stand_ins"] = others[row["block"]]
    convert(model, config.stand_in_config)
    fitted = fit(model, blocks, FitConfig(steps=config.fit_steps, batch_size=config.batch_size), progress=progress)
    for module in model.modules():
        if isinstance(module, CompressedExperts):
            module.remove_experts()
    report["stand_in"] = {"form": config.stand_in, "r": config.stand_in_config.resolved(_intermediate(model)).r}
    report["fit"] = fitted
    return report


def _intermediate(model: nn.Module) -> int:
    """Neurons per expert of ``model``'s MoE blocks."""
    return next(moe_blocks(model, family_of(model)))[1].experts.down_proj.shape[-1]


__all__ = [
    "CRITERIA",
    "PRUNABLE",
    "STAND_INS",
    "PruneConfig",
    "check_calibration",
    "check_prunable",
    "check_stand_in",
    "expert_scores",
    "kept_experts",
    "kept_first",
    "min_calibration_tokens",
    "prune",
    "remove_experts",
]
