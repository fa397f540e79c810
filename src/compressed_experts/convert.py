"""Walk a transformers MoE model and swap each block's experts for compressed experts."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .architectures import family_of, moe_blocks
from .config import CEConfig, Settings, collapsed, mark_config, per_block
from .errors import CompressedExpertsError, UnsupportedModelError
from .layer import CompressedExperts, is_compressed_expert
from .neurons import select_neurons, weight_importance


def _check_experts_layout(name: str, experts) -> None:
    """Refuse expert modules whose weights are not the plain fused [E, 2I, H] / [E, H, I] layout."""
    fused = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    odd = (
        fused is None
        or down is None
        or fused.dim() != 3
        or getattr(experts, "is_transposed", False)
        or getattr(experts, "has_bias", False)
        or not getattr(experts, "has_gate", True)
    )
    if odd:
        raise UnsupportedModelError(
            f"{name}.experts does not hold its weights as gate_up_proj [E, 2I, H] and down_proj "
            f"[E, H, I] without biases; this layout is not supported"
        )


def convert(model: PreTrainedModel, config: Settings | list[CEConfig]) -> PreTrainedModel:
    """Give every MoE block of ``model`` compressed experts, in place, and return ``model``.

    ``config`` is one :class:`CEConfig` for every block, or one per MoE block in model order
    (a plan: :func:`compressed_experts.plan.plan` chooses them, ``read_plan`` reads plan.json).

    Each block keeps its router, shared experts and expert weights; only its ``experts``
    submodule is replaced. With ``config.n_ce = 0`` the outputs are unchanged; with fresh
    compressed experts (all 1.0), or ``form="none"``, the model runs the top ``k - n_ce``
    experts of each token with the router's weights as they are (not renormalised); with a
    per-token rule (``config.top_p``, ``config.skip_below``) as many as the rule keeps. The
    ``subset`` and ``slim`` forms start from each expert's most important neurons as judged
    from the weights alone; :func:`compressed_experts.fit` judges them on calibration text.
    """
    layers = swap_blocks(model, config)
    for layer in layers:
        layer.converted_from = model.name_or_path or "this model"
        if layer.form_spec.selects_neurons:
            select_neurons(layer, weight_importance(layer))
    return model


def swap_blocks(
    model: PreTrainedModel, config: Settings | list[CEConfig], saved: bool = False
) -> list[CompressedExperts]:
    """:func:`convert` without choosing neurons: for building a model whose weights a loader fills
    (``saved``: shaped as a saved checkpoint holds them, so a block pruned with stand-ins holds
    only its kept experts' weights)."""
    if not isinstance(model, PreTrainedModel):
        raise CompressedExpertsError(f"convert takes a loaded transformers model, got {type(model).__name__}")
    family = family_of(model)
    blocks = list(moe_blocks(model, family))
    if not blocks:
        raise UnsupportedModelError(f"found no {family.block_class} in this {family.name} model")
    if any(isinstance(block.experts, CompressedExperts) for _, block in blocks):
        raise CompressedExpertsError(
            "this model already has compressed experts; load the original model to convert it again"
        )
    configs = per_block(config, len(blocks))
    for name, block in blocks:
        _check_experts_layout(name, block.experts)
    # Every block's setting is checked (top-k, r) before any block is swapped.
    for one in set(configs):
        one.check_top_k(model.config.num_experts_per_tok)
    configs = [c.resolved(block.experts.down_proj.shape[-1]) for c, (_, block) in zip(configs, blocks)]
    for one, (_, block) in zip(configs, blocks):
        block.experts = CompressedExperts(
            block.experts,
            one.n_ce,
            one.form,
            one.r,
            top_p=one.top_p,
            skip_below=one.skip_below,
            kept_experts=one.kept_experts,
        )
        if saved and one.kept_experts is not None:
            block.experts.remove_experts()
    mark_config(model.config, collapsed(configs))
    return [block.experts for _, block in blocks]


def check_plan_fits(plan: dict, model: PreTrainedModel) -> tuple[CEConfig, ...]:
    """The settings of a plan (:func:`compressed_experts.config.read_plan_file`), refused before any
    change when the model is not one it was made for: another number of MoE blocks or of experts,
    or a top-k that a setting does not fit."""
    blocks = list(moe_blocks(model, family_of(model)))
    configs = plan["configs"]
    experts = blocks[0][1].experts.gate_up_proj.shape[0] if blocks else 0
    if len(configs) != len(blocks) or plan.get("num_experts") not in (None, experts):
        raise CompressedExpertsError(
            f"this plan is for a model of {len(configs)} MoE blocks of {plan.get('num_experts')} experts; this model "
            f"has {len(blocks)} blocks of {experts}: plan this model (compressed-experts plan)"
        )
    for config in set(configs):
        config.check_top_k(model.config.num_experts_per_tok)
    return configs


def ce_config_of(model: PreTrainedModel) -> Settings | None:
    """The compressed-experts settings of a converted model (``r`` resolved), or None for a plain one:
    one :class:`CEConfig` when every block has the same, else a tuple of one per block (a plan)."""
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    return collapsed(tuple(layer.ce_config for layer in layers)) if layers else None


def float32_compressed_experts(model: PreTrainedModel) -> PreTrainedModel:
    """Hold ``model``'s compressed experts in float32 whatever its dtype, in place; returns it.

    For training a bfloat16 or float16 model with any trainer or loop: the vectors start at 1.0,
    where a bfloat16 number has steps of 2^-7, so an optimizer step of 2e-5 rounds away and they
    never move. The layer casts them to the activations' dtype per call (same outputs), and they
    save in float32. Build the optimizer (and shard the model) after this call.
    """
    params = [p for name, p in model.named_parameters() if is_compressed_expert(name)]
    if not params:
        raise CompressedExpertsError("this model has no compressed-expert parameters: convert it first")
    for param in params:
        if param.dtype != torch.float32:
            param.data = param.data.float()
    return model
