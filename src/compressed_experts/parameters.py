"""Parameter accounting: how many parameters a token actually touches."""

from __future__ import annotations

from transformers import PreTrainedModel

from .adapters import base_of, named_weights
from .architectures import family_of, moe_blocks
from .layer import CompressedExperts, is_compressed_expert

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def active_parameters(model: PreTrainedModel) -> dict[str, int | float]:
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

    A PEFT model is counted as it will be served once merged: its base weights and the adapter's
    compressed experts, without the LoRA weights or the frozen originals PEFT keeps beside them.
    """
    model = base_of(model)
    family = family_of(model)
    top_k = model.config.num_experts_per_tok
    parts = dict.fromkeys(
        ("embeddings", "attention", "routers", "main_experts", "shared_experts", "compressed_experts", "other"), 0
    )
    total = 0
    full_experts = 0  # routed-expert parameters per token when running all k experts
    equivalents = []  # per block
    owner: dict[str, str] = {}  # parameter name prefix -> part, for parameters inside MoE blocks
    for name, block in moe_blocks(model, family):
        experts = block.experts
        num_experts = experts.gate_up_proj.shape[0]
        per_expert = sum(getattr(experts, w).numel() for w in _EXPERT_WEIGHTS) // num_experts
        n_ce = experts.n_ce if isinstance(experts, CompressedExperts) else 0
        parts["main_experts"] += (top_k - n_ce) * per_expert
        full_experts += top_k * per_expert
        auxiliary = n_ce * experts.form_spec.auxiliary_cost(experts) if n_ce else 0
        parts["compressed_experts"] += auxiliary
        equivalents.append(top_k - n_ce + auxiliary / per_expert)
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
    active = sum(parts.values())
    active_full = active - parts["main_experts"] - parts["compressed_experts"] + full_experts
    return {
        "total": total,
        "active": active,
        **parts,
        "active_full_topk": active_full,
        "active_saving": 1.0 - active / active_full,
        "expert_equivalents": sum(equivalents) / len(equivalents) if equivalents else 0.0,
        "added": sum(p.numel() for n, p in weights.items() if is_compressed_expert(n)),
    }


def describe(model: PreTrainedModel) -> dict[str, int | float | str]:
    """:func:`active_parameters` plus the structure a user checks first: family, blocks, experts, top-k, n_ce.

    Works on a model built on the meta device (no weights), so large checkpoints can be described cheaply.
    """
    family = family_of(model)
    blocks = [block for _, block in moe_blocks(model, family)]
    top_k = model.config.num_experts_per_tok
    converted = next((b.experts for b in blocks if isinstance(b.experts, CompressedExperts)), None)
    n_ce = converted.n_ce if converted is not None else 0
    return {
        "family": family.name,
        "moe_blocks": len(blocks),
        "experts": blocks[0].experts.gate_up_proj.shape[0] if blocks else 0,
        "top_k": top_k,
        "n_ce": n_ce,
        "form": converted.form if converted is not None else "-",
        "r": converted.r if converted is not None and converted.r is not None else "-",
        "main_experts_per_token": top_k - n_ce,
        **active_parameters(model),
    }
