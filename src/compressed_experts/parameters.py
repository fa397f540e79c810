"""Parameter accounting: how many parameters a token actually touches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from .adapters import base_of, named_weights
from .architectures import family_of, moe_blocks
from .errors import CompressedExpertsError
from .layer import CompressedExperts, is_compressed_expert
from .routing import split_routing

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _padded(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one ``[batch, longest]`` tensor padded on the right, and its attention mask."""
    ids = torch.zeros(len(sequences), max(map(len, sequences), default=0), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


@torch.no_grad()
def measure_main_experts(
    model: PreTrainedModel,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict[CompressedExperts, float]:
    """The average number of main experts per token of every block with a per-token rule, measured by
    running ``model`` on ``input_ids`` (``[batch, length]``, or a list of token id lists of any
    lengths), ``batch_size`` sequences at a time; tokens where ``attention_mask`` is 0 are not
    counted. The counts stay on the device until the end."""
    layers = [m for m in base_of(model).modules() if isinstance(m, CompressedExperts) and m.dynamic]
    if not isinstance(input_ids, torch.Tensor):  # lists of ids: padded here, the padding masked
        input_ids, attention_mask = _padded(input_ids)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise CompressedExpertsError("input_ids must be non-empty token ids, [batch, length] or a list of lists")
    device = next(model.parameters()).device
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device)
    if not mask.sum() > 0:
        raise CompressedExpertsError("attention_mask leaves no token to measure on")
    counts = {layer: torch.zeros((), device=device) for layer in layers}
    keep = mask  # the part of the mask of the batch running now

    def count(layer, args, kwargs, output) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        split = split_routing(values[1], values[2], layer.n_ce, layer.top_p, layer.skip_below, layer.kept_experts)
        per_token = (~split.main_skip).sum(dim=-1)
        counts[layer] += (per_token * keep.reshape(-1).to(per_token.device)).sum().to(device)

    handles = [layer.register_forward_hook(count, with_kwargs=True) for layer in layers]
    was_training = model.training
    try:
        model.eval()
        for ids, keep in zip(input_ids.to(device).split(batch_size), mask.split(batch_size)):
            model(input_ids=ids, attention_mask=keep)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    tokens = mask.sum().item()
    return {layer: total.item() / tokens for layer, total in counts.items()}


def active_parameters(
    model: PreTrainedModel,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, int | float]:
    """Total parameters, parameters active per token by part, and the unconverted model's figure.

    Keys: ``total``; ``active`` (per token) and its parts ``embeddings`` (input and output,
    counted whole as is the custom for "active parameters"), ``attention``, ``routers``,
    ``main_experts`` (the ``m`` full experts a token runs), ``shared_experts``,
    ``compressed_experts`` (what a token's ``n_ce`` auxiliary experts cost: the vectors it
    averages for ``ia3``, ``3·H·r`` weights each for ``subset`` and ``slim``), ``other`` (norms,
    dense MLP layers); ``active_full_topk`` (the same model running all ``k`` routed experts,
    no compressed experts), ``active_saving`` (the fraction of it saved);
    ``expert_equivalents`` (routed-expert parameters a token runs per MoE block, in units of
    one full expert: ``k`` for full top-k, ``m + n_ce·r/I`` for ``subset``) and ``added``
    (parameters the compressed experts add to the model's memory).

    ``main_experts_per_token`` is the full experts a token runs per MoE block (``m``).

    A model with a per-token rule (``top_p``, ``skip_below``) runs a number of main experts that
    varies with the text: it is measured on ``input_ids`` (``[batch, length]`` token ids with an
    optional ``attention_mask``, or a list of token id lists; see :func:`measure_main_experts`), and
    the per-token figures are averages over those tokens (rounded to whole parameters). Such a
    model without ``input_ids`` is refused. A model with a fixed ``n_ce`` needs no text, and
    ignores it.

    A PEFT model is counted as it will be served once merged: its base weights and the adapter's
    compressed experts, without the LoRA weights or the frozen originals PEFT keeps beside them.
    """
    model = base_of(model)
    family = family_of(model)
    top_k = model.config.num_experts_per_tok
    dynamic = [m for m in model.modules() if isinstance(m, CompressedExperts) and m.dynamic]
    measured: dict[CompressedExperts, float] = {}
    if dynamic:
        if input_ids is None:
            raise CompressedExpertsError(
                f"this model chooses its main experts per token ({dynamic[0].ce_config.rule}), so its active "
                f"parameters depend on the text: give input_ids (token ids of text like the model will see) "
                f"to measure them on",
                settings=("input_ids",),
            )
        measured = measure_main_experts(model, input_ids, attention_mask)
    parts = dict.fromkeys(
        ("embeddings", "attention", "routers", "main_experts", "shared_experts", "compressed_experts", "other"), 0
    )
    total = 0
    full_experts = 0  # routed-expert parameters per token when running all k experts
    equivalents = []  # per block
    mains = []  # per block
    owner: dict[str, str] = {}  # parameter name prefix -> part, for parameters inside MoE blocks
    for name, block in moe_blocks(model, family):
        experts = block.experts
        num_experts = experts.gate_up_proj.shape[0]
        per_expert = sum(getattr(experts, w).numel() for w in _EXPERT_WEIGHTS) // num_experts
        if experts in measured:
            main = measured[experts]
        else:
            main = top_k - (experts.n_ce if isinstance(experts, CompressedExperts) else 0)
        parts["main_experts"] += main * per_expert
        full_experts += top_k * per_expert
        auxiliary = (top_k - main) * experts.form_spec.auxiliary_cost(experts) if main < top_k else 0
        parts["compressed_experts"] += auxiliary
        mains.append(main)
        equivalents.append(main + auxiliary / per_expert)
        owner[f"{name}.experts."] = "experts"
        owner[f"{name}.{family.router_attr}."] = "routers"
        for attr in family.shared_attrs:
            owner[f"{name}.{attr}."] = "shared_experts"
    embedding_ids = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    weights = dict(named_weights(model))
    for name, param in weights.items():
        total += param.numel()
        part = next((p for prefix, p in owner.items() if name.startswith(prefix)), None)
        if part == "experts":
            continue  # counted per token above
        if part is None:
            if id(param) in embedding_ids:
                part = "embeddings"
            elif ".self_attn." in name or ".attention." in name:
                part = "attention"
            else:
                part = "other"
        parts[part] += param.numel()
    parts = {name: round(count) for name, count in parts.items()}  # averages when measured
    active = sum(parts.values())
    active_full = active - parts["main_experts"] - parts["compressed_experts"] + full_experts
    return {
        "total": total,
        "active": active,
        **parts,
        "active_full_topk": active_full,
        "active_saving": 1.0 - active / active_full,
        "expert_equivalents": sum(equivalents) / len(equivalents) if equivalents else 0.0,
        "main_experts_per_token": sum(mains) / len(mains) if mains else 0.0,
        "added": sum(p.numel() for n, p in weights.items() if is_compressed_expert(n)),
    }


def describe(
    model: PreTrainedModel,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, int | float | str]:
    """:func:`active_parameters` plus the structure a user checks first: family, blocks, experts, top-k,
    the rule (``n_ce``, or a per-token ``top_p`` / ``skip_below``), form and ``r``.

    Works on a model built on the meta device (no weights), so large checkpoints can be described
    cheaply. A model with a per-token rule is described without the active-parameter figures
    unless ``input_ids`` are given to measure them on (which needs its weights).
    """
    family = family_of(model)
    blocks = [block for _, block in moe_blocks(model, family)]
    converted = [b.experts for b in blocks if isinstance(b.experts, CompressedExperts)]
    configs = [layer.ce_config for layer in converted]
    config = configs[0] if configs and len(set(configs)) == 1 else None  # None: plain, or a plan per block

    def each(values) -> str:  # a plan's blocks, one value per block
        return ", ".join("-" if v is None else str(v) for v in values)

    structure = {
        "family": family.name,
        "moe_blocks": len(blocks),
        "experts": blocks[0].experts.gate_up_proj.shape[0] if blocks else 0,
        "top_k": model.config.num_experts_per_tok,
        "n_ce": 0 if not configs else each(c.n_ce for c in configs) if config is None else config.n_ce,
        "rule": "-" if not configs else "per block (a plan)" if config is None else config.rule,
        "form": "-" if not configs else each(c.form for c in configs) if config is None else config.form,
        "r": "-" if not configs else each(c.r for c in configs) if config is None else config.r,
    }
    if structure["n_ce"] is None:  # a per-token rule has no one n_ce
        structure["n_ce"] = "-"
    if structure["r"] is None:
        structure["r"] = "-"
    if any(c.dynamic for c in configs) and input_ids is None:
        return structure  # how many experts run depends on the text: active_parameters says so
    return {**structure, **active_parameters(model, input_ids, attention_mask)}
