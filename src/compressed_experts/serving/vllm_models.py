"""vLLM model classes for compressed-experts checkpoints: vLLM's own model of each family, with its
fused MoE experts replaced by a block that runs the library's compressed experts.

Every supported family's vLLM model builds its routed experts with one call,
``FusedMoEFactory(...)``, handing it the family's routing (softmax or sigmoid, top-k,
renormalisation, grouped top-k with a bias, PhiMoE's sparsemixer as a custom routing function,
a routed scaling factor), its shared experts and its gate. While a ``CompressedExperts<Base>``
model is built, that name in the family's module points to :class:`CompressedExpertsRunner`,
which takes the same arguments and:

- routes each token with the router vLLM itself builds from them (``create_fused_moe_router``),
  so each family's routing is vLLM's, unchanged;
- computes the routed experts with :class:`compressed_experts.layer.CompressedExperts` (the
  library's forms, per-token rules and compute backends: the same math as ``ce.from_pretrained``);
  a model pruned with stand-ins (``kept_experts``) holds the kept experts' weights and the removed
  ones' compressed experts only, while the router still picks among all its experts;
  on vLLM's CPU build, the main experts of forms ``none``, ``slim`` and ``subset`` under a fixed
  ``n_ce`` or ``kept_experts`` go through vLLM's own fused CPU MoE kernel instead, the auxiliary
  experts through the library's products (:meth:`CompressedExpertsRunner.prepare_fused`; a per-token
  rule stays on the library's block), inside a
  ``torch.library`` custom op with a fake implementation, so that vLLM's torch.compile treats it
  as one opaque call (its shapes inside depend on the routing);
- runs the family's shared experts (built by vLLM) beside it, applies the scaling vLLM would,
  and all-reduces over tensor-parallel ranks.

Attention, norms, embeddings, the LM head and the loading of every other weight stay vLLM's, with
corrections where vLLM's own model computes something else than transformers' does on the
checkpoints this library saves: PhiMoE's biases a config says it has none of are zeroed and its LM
head's bias is added (vLLM leaves it out), and DeepSeek-V3's rotary embedding runs vLLM's PyTorch
version on CPU (:func:`_match_transformers`, :func:`_logits_with_head_bias`).
The expert weights and the compressed experts are read by :meth:`CompressedExpertsRunner.load_one`
from the checkpoint's names (``experts.<e>.gate_proj.weight`` or ``w1``/``w3``/``w2``,
``experts.compressed.ce_gate`` or ``experts.ce_gate``), cut to the rank's shard
(:mod:`compressed_experts.serving.sharding`). A compressed-expert weight whose shape disagrees
with the form and ``r`` of config.json, one the form does not have, or one missing from the
checkpoint is refused with an error naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

from ..architectures import family_of, moe_blocks
from ..backends.grouped import placed
from ..backends.products import run_all
from ..checkpoint import skeleton
from ..config import SECTION, CEConfig
from ..errors import CheckpointError
from ..forms import CE_PARAMETERS, get_form
from ..layer import CompressedExperts
from ..routing import split_routing
from .sharding import local_settings, shard
from .vllm_plugin import served_settings

#: base architecture (as transformers names it) -> (vLLM module, vLLM class) of the families vLLM implements.
FAMILIES: dict[str, tuple[str, str]] = {
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "PhimoeForCausalLM": ("phimoe", "PhiMoEForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
}

# The checkpoint's spellings of one expert's projections (transformers' names and Mixtral/PhiMoE's).
_EXPERT_WEIGHT = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}

# Runners by a name unique in this process, for the custom op to find its block (as vLLM's own
# fused MoE op finds its layer by name).
_RUNNERS: weakref.WeakValueDictionary[str, CompressedExpertsRunner] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()

# vLLM's portable CPU fused MoE kernel (its CPUUnquantizedExperts): weights prepacked for ISA "vec",
# the intermediate dimension zero-padded to a multiple of 32, the hidden dimension a multiple of 32.
_FUSED_ISA = "vec"
_FUSED_ALIGN = 32
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
#: The forms whose main experts run plain, as the fused kernel computes them.
_FUSED_FORMS = ("none", "slim", "subset")


def _on_cpu() -> bool:
    """Whether vLLM runs on its CPU build."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_fused_moe_ops() -> tuple[Any, Any] | None:
    """vLLM's ``(cpu_fused_moe, cpu_prepack_moe_weight)`` where vLLM runs on CPU, else None."""
    try:
        from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    except ImportError:
        return None
    return (cpu_fused_moe, cpu_prepack_moe_weight) if _on_cpu() else None


@torch.library.custom_op("compressed_experts::routed_experts", mutates_args=())
def routed_experts(hidden_states: torch.Tensor, router_logits: torch.Tensor, runner: str) -> torch.Tensor:
    """The routed experts' output of the block registered as ``runner`` (one opaque call for torch.compile)."""
    return _RUNNERS[runner].routed(hidden_states, router_logits)


@routed_experts.register_fake
def _(hidden_states: torch.Tensor, router_logits: torch.Tensor, runner: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def settings_by_block(hf_config: Any, source: str) -> Callable[[str], CEConfig]:
    """The compressed-experts settings of the MoE block built at ``prefix`` (``model.layers.<i>...``),
    as the checkpoint's config carries them (:func:`served_settings`; refused when absent): one setting
    for every block, or a plan's, one per MoE block in model order. A plan's blocks are matched by
    their decoder layer's index, read from the model's own structure (built on the meta device from
    ``source``): families whose first layers are dense (DeepSeek-V3) or that skip layers (Qwen2-MoE's
    sparse step) number their MoE blocks differently from their layers."""
    settings = served_settings(getattr(hf_config, SECTION, None))
    if isinstance(settings, CEConfig):
        return lambda prefix: settings
    shape = skeleton(source)
    layers = [_layer_index(name) for name, _ in moe_blocks(shape, family_of(shape))]
    by_layer = dict(zip(layers, settings, strict=True))  # skeleton refused a plan of another length

    def settings_at(prefix: str) -> CEConfig:
        layer = _layer_index(prefix)
        if layer not in by_layer:
            raise CheckpointError(
                f"vLLM builds a MoE block at {prefix}, but the checkpoint's plan has MoE blocks at layers "
                f"{sorted(by_layer)}: this vLLM's model of the family places its MoE blocks differently"
            )
        return by_layer[layer]

    return settings_at


def _layer_index(name: str) -> int:
    """The decoder layer a module belongs to, from its name (``model.layers.3.mlp.experts``: 3)."""
    found = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    if found is None:
        raise CheckpointError(f"cannot tell which decoder layer {name!r} belongs to (no 'layers.<index>' in it)")
    return int(found.group(1))


class _Fused(NamedTuple):
    """What :meth:`CompressedExpertsRunner.prepare_fused` packs: vLLM's kernel and (w13, w2) packed for it,
    of the main experts and of ``slim``'s auxiliary MLPs (None: the library's products run those)."""

    kernel: Callable[..., None]
    main: tuple[torch.Tensor, torch.Tensor]
    auxiliary: tuple[torch.Tensor, torch.Tensor] | None


def _packed(prepack: Callable, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU-gated experts ``gate_up [E, 2n, H]`` (gate rows first) and ``down [E, H, n]`` packed for vLLM's
    fused CPU kernel, ``n`` zero-padded to its alignment (exact: a padded neuron adds SiLU(0) * 0)."""
    experts, hidden, inter = down.shape
    padded = -(-inter // _FUSED_ALIGN) * _FUSED_ALIGN
    with torch.no_grad():
        w13 = gate_up.new_zeros(experts, 2 * padded, hidden)
        w13[:, :inter] = gate_up[:, :inter]
        w13[:, padded : padded + inter] = gate_up[:, inter:]
        w2 = down.new_zeros(experts, hidden, padded)
        w2[:, :, :inter] = down
    return prepack(w13, _FUSED_ISA), prepack(w2, _FUSED_ISA)


def _fused_run(
    kernel: Callable[..., None],
    x: torch.Tensor,
    packed: tuple[torch.Tensor, torch.Tensor],
    index: torch.Tensor,
    weights: torch.Tensor,
    skip: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_i w_i expert_i(x)`` over each token's slots through vLLM's kernel; slots in ``skip`` add nothing
    (weight 0, an id in range): the kernel runs the same number of slots for every token."""
    if skip is not None:
        index, weights = index.masked_fill(skip, 0), weights.masked_fill(skip, 0.0)
    out = torch.empty_like(x)
    kernel(
        out,
        x,
        *packed,
        None,
        None,
        weights.float().contiguous(),
        index.to(torch.int32).contiguous(),
        "silu",
        _FUSED_ISA,
        False,
    )
    return out


class CompressedExpertsRunner(nn.Module):
    """Stands where vLLM's fused MoE runner stands (``block.experts``), with the same call:
    ``forward(hidden_states, router_logits)`` returns the routed experts' output plus the shared
    experts' (when the family has them), all-reduced over tensor-parallel ranks."""

    def __init__(
        self,
        *,
        ce: CEConfig,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        prefix: str = "",
        renormalize: bool = True,
        use_grouped_topk: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        custom_routing_function: Any = None,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        apply_routed_scale_to_output: bool = False,
        e_score_correction_bias: torch.Tensor | None = None,
        activation: str = "silu",
        quant_config: Any = None,
        shared_experts: nn.Module | None = None,
        gate: nn.Module | None = None,
        enable_eplb: bool = False,
        is_sequence_parallel: bool = False,
        fuse_shared_experts: bool = False,
        reduce_results: bool = True,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        refused = {
            "quantization": quant_config is not None,
            "expert-parallel load balancing (EPLB)": enable_eplb,
            "sequence-parallel MoE": is_sequence_parallel,
            "fused shared experts": fuse_shared_experts,
            f"activation {activation!r} (the experts are SiLU-gated)": activation != "silu",
        }
        for what, on in refused.items():
            if on:
                raise CheckpointError(f"compressed-experts serving does not support {what}")
        ce.check_top_k(top_k)
        self.prefix = prefix
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.ce_config = ce.resolved(intermediate_size)
        form, r = local_settings(self.ce_config.form, self.ce_config.r, intermediate_size, self.tp_size, self.tp_rank)
        self.scale_output = routed_scaling_factor if apply_routed_scale_to_output else 1.0
        self.router = create_fused_moe_router(
            top_k=top_k,
            global_num_experts=num_experts,
            renormalize=renormalize,
            use_grouped_topk=use_grouped_topk,
            num_expert_group=num_expert_group,
            topk_group=topk_group,
            custom_routing_function=custom_routing_function,
            scoring_func=scoring_func,
            routed_scaling_factor=1.0 if apply_routed_scale_to_output else routed_scaling_factor,
            e_score_correction_bias=e_score_correction_bias,
        )
        # Not submodules of this block: vLLM's model owns them and loads their weights.
        self.__dict__["gate"] = gate
        self.__dict__["shared_experts"] = shared_experts
        # The rule as the checkpoint gives it: a fixed n_ce, or top_p / skip_below chosen per token from
        # the router's weights (replicated on every rank, so every rank's mask is the same), or
        # kept_experts (pruned with stand-ins): the router picks among all num_experts, the block holds
        # the kept ones' weights and the removed ones' compressed experts.
        self.ce = _library_block(ce, form, r, num_experts, hidden_size, intermediate_size // self.tp_size)
        self.ce_names = set(get_form(self.ce_config.form).parameters)  # what the checkpoint must hold
        self.name = f"{prefix}#{next(_COUNTER)}"
        self.__dict__["fused"] = None  # a _Fused once prepare_fused packs the weights
        _RUNNERS[self.name] = self

    def extra_repr(self) -> str:
        return f"{self.ce_config}, tp={self.tp_size}"

    def routed(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The routed experts' output on this rank (before the all-reduce)."""
        weights, index = self.router.select_experts(hidden_states, router_logits)
        fused, layer = self.fused, self.ce
        weights, index = weights.to(hidden_states.dtype), index.long()
        if fused is None:
            return layer(hidden_states, index, weights)
        # vLLM's fused kernel (prepare_fused) on the main experts, weights as the router gave them (the
        # library's split): a fixed n_ce's m heaviest; under kept_experts every slot, a removed expert's
        # at weight 0. Then slim's auxiliary MLPs through the same kernel (their own packed weights, the
        # pairs that are not auxiliary at weight 0), or subset's through the library's products.
        split = split_routing(index, weights, layer.n_ce, kept_experts=layer.kept_experts)
        x = hidden_states.contiguous()
        if not x.shape[0]:
            return torch.empty_like(x)
        out = _fused_run(fused.kernel, x, fused.main, split.main_index, split.main_weights, split.main_skip)
        if fused.auxiliary is not None:
            return out + _fused_run(
                fused.kernel, x, fused.auxiliary, split.aux_index, split.aux_weights, split.aux_skip
            )
        others = layer.form_spec.runs(layer, split)[1:]
        return out + run_all(x, others, layer.act_fn, grouped=placed(x, others)) if others else out

    def prepare_fused(self) -> None:
        """After the weights load, on vLLM's CPU build: pack this rank's expert weights for vLLM's fused CPU
        MoE kernel, which :meth:`routed` then runs on each token's main experts (as vLLM runs full
        top-k), for the forms whose main experts run plain (``none``, ``slim``, ``subset``; ``ia3``
        scales them per token) under a fixed ``n_ce > 0`` or ``kept_experts`` (pruned with stand-ins:
        every routed slot, a removed expert's at weight 0). ``slim``'s auxiliary experts are small
        MLPs of the same shape, so they are packed and run the same way. A per-token rule (``top_p``,
        ``skip_below``) keeps the library's block: the kernel runs the same number of experts for every
        token, so it would run all k. The packed copies are zero-padded along the intermediate
        dimension (exact: padded neurons give SiLU(0) * 0 = 0)."""
        if self.fused is not None:  # packed already: the plain weights are gone to the meta device
            return
        layer = self.ce
        ops = _cpu_fused_moe_ops()
        weight = layer.gate_up_proj
        if (
            ops is None
            or layer.form not in _FUSED_FORMS
            or layer.top_p is not None
            or layer.skip_below is not None
            or layer.n_ce == 0
            or weight.device.type != "cpu"
            or weight.dtype not in _FUSED_DTYPES
            or layer.down_proj.dtype != weight.dtype
            or layer.hidden_dim % _FUSED_ALIGN
        ):
            return
        kernel, prepack = ops
        # The rows held: under kept_experts the kept experts only (the router's ids below kept_experts).
        main = _packed(prepack, weight, layer.down_proj)
        auxiliary = None
        if layer.form == "slim" and layer.ce_gate_up_proj.dtype == weight.dtype:
            auxiliary = _packed(prepack, layer.ce_gate_up_proj, layer.ce_down_proj)
            layer.ce_gate_up_proj = nn.Parameter(layer.ce_gate_up_proj.to("meta"), requires_grad=False)
            layer.ce_down_proj = nn.Parameter(layer.ce_down_proj.to("meta"), requires_grad=False)
        self.__dict__["fused"] = _Fused(kernel, main, auxiliary)
        if layer.form != "subset":  # subset's auxiliary experts read the first neurons of these weights
            # Held once, packed, as vLLM holds its own experts: the plain copies keep their shapes, no storage.
            layer.gate_up_proj = nn.Parameter(weight.to("meta"), requires_grad=False)
            layer.down_proj = nn.Parameter(layer.down_proj.to("meta"), requires_grad=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.gate is not None:  # the families that hand vLLM's runner their gate
            router_logits, _ = self.gate(hidden_states)
        out = routed_experts(hidden_states, router_logits, self.name)
        if self.scale_output != 1.0:
            out = out * self.scale_output
        if self.shared_experts is not None:
            shared = self.shared_experts(hidden_states if shared_experts_input is None else shared_experts_input)
            out = out + (shared[0] if isinstance(shared, tuple) else shared)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    # -- weights -------------------------------------------------------------------------------

    def load_one(self, name: str, weight: torch.Tensor) -> str | None:
        """Load the checkpoint tensor ``experts.<name>`` into this rank's block; the parameter's name
        (relative to this module), or None when ``name`` is no expert weight."""
        layer = self.ce
        if self.fused is not None and (_EXPERT_WEIGHT.match(name) or name.rsplit(".", 1)[-1] in self.ce_names):
            # The experts were packed for the fused kernel and their plain copies dropped: new values would
            # land nowhere and the engine would go on serving the old ones.
            raise CheckpointError(
                f"{self.prefix}: expert weights loaded again after they were packed for vLLM's fused CPU kernel "
                f"({name}); reloading weights into a running engine is not supported: start a new engine"
            )
        found = _EXPERT_WEIGHT.match(name)
        if found:
            e, part = int(found.group(1)), _PART[found.group(2)]
            inter = layer.intermediate_dim
            if part == "down":
                target, piece = layer.down_proj[e], shard("down_proj", weight, self.tp_size, self.tp_rank)
            else:
                rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
                target = layer.gate_up_proj[e, rows]
                piece = shard(f"{part}_proj", weight, self.tp_size, self.tp_rank)
            self._copy(f"experts.{name}", target, piece)
            return "ce.gate_up_proj" if part != "down" else "ce.down_proj"
        if name in ("gate_up_proj", "down_proj"):  # fused [E, 2I, H] / [E, H, I], as transformers v5 holds them
            target = getattr(layer, name)
            self._copy(f"experts.{name}", target, shard(name, weight, self.tp_size, self.tp_rank))
            return f"ce.{name}"
        leaf = name.removeprefix("compressed.")  # saved as experts.compressed.ce_gate, or experts.ce_gate
        if leaf not in CE_PARAMETERS:
            return None
        if leaf not in self.ce_names:
            raise CheckpointError(
                f"{self.prefix}.{name}: the checkpoint holds compressed experts ({leaf}) that its config's form "
                f"{self.ce_config.form!r} does not have: config.json and the weights disagree"
            )
        if not hasattr(layer, leaf):  # this rank runs the subset form's main experts only: nothing to hold
            return None
        expected = _full_shape(leaf, layer, self.ce_config, self.tp_size)
        if tuple(weight.shape) != expected:
            raise CheckpointError(
                f"{self.prefix}.{name} has shape {tuple(weight.shape)}, but form {self.ce_config.form!r}"
                f"{'' if self.ce_config.r is None else f' with r={self.ce_config.r}'} needs {expected}: "
                f"config.json and the weights disagree"
            )
        target = getattr(layer, leaf)
        self._copy(f"experts.{name}", target, shard(leaf, weight, self.tp_size, self.tp_rank))
        return next(n for n, p in self.named_parameters() if p is target)

    def _copy(self, name: str, target: torch.Tensor, piece: torch.Tensor) -> None:
        if tuple(target.shape) != tuple(piece.shape):
            raise CheckpointError(
                f"{self.prefix}.{name}: shape {tuple(piece.shape)} on this rank, the model needs {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(piece)


def _library_block(
    ce: CEConfig, form: str, r: int | None, num_experts: int, hidden: int, local: int
) -> CompressedExperts:
    """The library's block over one rank's shard (``local`` neurons per expert), its weights to be loaded.

    Under ``kept_experts`` it is built on the meta device with all ``num_experts`` rows (the router's
    count, which the block keeps), then holds real storage for the kept experts' rows and the removed
    ones' compressed experts only: a pruned model never allocates the weights pruning removed."""
    kept = ce.kept_experts
    device = torch.device("meta") if kept is not None else None
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden, device=device), requires_grad=False)
    experts.down_proj = nn.Parameter(torch.empty(num_experts, hidden, local, device=device), requires_grad=False)
    experts.act_fn = nn.SiLU()
    block = CompressedExperts(
        experts, ce.n_ce, form=form, r=r, top_p=ce.top_p, skip_below=ce.skip_below, kept_experts=kept
    ).requires_grad_(False)
    if kept is not None:
        block.gate_up_proj = nn.Parameter(torch.empty(kept, 2 * local, hidden), requires_grad=False)
        block.down_proj = nn.Parameter(torch.empty(kept, hidden, local), requires_grad=False)
        for name, param in list(block.compressed.named_parameters()):
            setattr(block.compressed, name, nn.Parameter(torch.empty(param.shape), requires_grad=False))
    return block


def _full_shape(leaf: str, layer: CompressedExperts, ce: CEConfig, tp: int) -> tuple[int, ...]:
    """The unsharded shape of compressed-expert parameter ``leaf`` for ``ce`` (as the checkpoint holds it):
    one row per expert that has compressed experts (under ``kept_experts``, the removed ones only)."""
    E, H, inter = layer.num_experts - layer.stand_in_offset, layer.hidden_dim, layer.intermediate_dim * tp
    r = ce.r or 0
    return {
        "ce_gate": (E, H),
        "ce_up": (E, H),
        "ce_down": (E, inter),
        "ce_gate_up_proj": (E, 2 * r, H),
        "ce_down_proj": (E, H, r),
    }[leaf]


@contextlib.contextmanager
def _runners_in(module: Any, settings_at: Callable[[str], CEConfig], **extra: Any) -> Iterator[None]:
    """While the family's model is built, its ``FusedMoEFactory`` builds compressed-experts blocks, each
    with the settings of its place (``settings_at(prefix)``)."""
    original = module.FusedMoEFactory

    def factory(**kwargs: Any) -> CompressedExpertsRunner:
        return CompressedExpertsRunner(ce=settings_at(kwargs.get("prefix", "")), **{**kwargs, **extra})

    module.FusedMoEFactory = factory
    try:
        yield
    finally:
        module.FusedMoEFactory = original


def _family_extra(base_arch: str, hf_config: Any) -> dict[str, Any]:
    """Arguments a family's vLLM block leaves out that its transformers model uses."""
    if base_arch == "PhimoeForCausalLM":
        # vLLM's PhiMoE fixes sparsemixer's threshold at 0.01; transformers reads router_jitter_noise
        # (0.01 in Phi-3.5-MoE's config). Use the config's, so every checkpoint routes as transformers does.
        from vllm.model_executor.models.phimoe import sparsemixer

        eps = float(getattr(hf_config, "router_jitter_noise", 0.01))

        def routing(hidden_states, gating_output, topk, renormalize):
            return sparsemixer(gating_output, jitter_eps=eps)

        return {"custom_routing_function": routing}
    return {}


#: Biases vLLM's PhiMoE always builds (Phi-3.5-MoE has them), by the transformers config flag that says
#: whether a checkpoint has them (False by default).
_PHIMOE_BIASES = {"attention_bias": (".qkv_proj.bias", ".o_proj.bias"), "lm_head_bias": ("lm_head.bias",)}


def _match_transformers(base_arch: str, model: nn.Module, hf_config: Any) -> None:
    """Make vLLM's model of the family compute what transformers' does, where they part (after it is built).

    - PhiMoE: vLLM builds the attention projections and the LM head with biases whatever the config
      says, and leaves a bias the checkpoint lacks uninitialised without complaint. Those the config
      says the model has none of are zeroed (exactly no bias); one the checkpoint holds overwrites it.
    - DeepSeek-V3 on CPU: vLLM 0.32's CPU rotary kernel (``ops.rotary_embedding``) miscomputes the
      3-D ``[tokens, heads, dim]`` tensors its MLA attention hands it (it is right for the 2-D ones
      other families pass), so every token after the first attends wrongly. Its rotary embeddings
      run their PyTorch version (``forward_native``) instead.
    """
    if base_arch == "PhimoeForCausalLM":
        absent = tuple(
            suffix
            for flag, suffixes in _PHIMOE_BIASES.items()
            if not getattr(hf_config, flag, False)
            for suffix in suffixes
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(absent):
                    param.zero_()
    if base_arch == "DeepseekV3ForCausalLM" and _on_cpu():
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

        for module in model.modules():
            if isinstance(module, RotaryEmbeddingBase):
                module._forward_method = module.forward_native


def model_class(base_arch: str) -> type[nn.Module]:
    """``CompressedExperts<base_arch>``: vLLM's model of the family with compressed-experts blocks."""
    module_name, class_name = FAMILIES[base_arch]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    base = getattr(module, class_name)

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        settings_at = settings_by_block(hf_config, vllm_config.model_config.model)
        if base_arch == "DeepseekV3ForCausalLM":
            # transformers' DeepSeek-V3 always routes by sigmoid scores with the correction bias; vLLM
            # reads that from fields DeepSeek's own config.json has and transformers' config may lack.
            for key, value in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
                if getattr(hf_config, key, None) is None:
                    setattr(hf_config, key, value)
        with _runners_in(module, settings_at, **_family_extra(base_arch, hf_config)):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        _match_transformers(base_arch, self, hf_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        runners = {m.prefix: m for m in self.modules() if isinstance(m, CompressedExpertsRunner)}
        loaded: set[str] = set()

        def others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, weight in weights:
                head, sep, tail = name.partition(".experts.")
                runner = runners.get(head + ".experts") if sep else None
                param = runner.load_one(tail, weight) if runner is not None else None
                if param is None:
                    yield name, weight
                else:
                    loaded.add(f"{runner.prefix}.{param}")

        loaded |= set(base.load_weights(self, others()))
        for runner in runners.values():
            runner.prepare_fused()
        missing = sorted(
            f"{r.prefix}.{n}"
            for r in runners.values()
            for n, p in r.named_parameters()
            if n.rsplit(".", 1)[-1] in r.ce_names and f"{r.prefix}.{n}" not in loaded
        )
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks compressed experts its config's form {next(iter(runners.values())).ce_config.form!r} "
                f"needs ({missing[0]}, {len(missing)} in all): config.json and the weights disagree"
            )
        return loaded

    methods = {"__init__": __init__, "load_weights": load_weights, "__module__": __name__}
    if base_arch == "PhimoeForCausalLM":
        methods["compute_logits"] = _logits_with_head_bias
    return type(f"CompressedExperts{base_arch}", (base,), methods)


def _logits_with_head_bias(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """PhiMoE's logits with its LM head's bias: vLLM's PhiMoE builds and loads that bias (Phi-3.5-MoE
    has one) but never adds it; zero where the config says there is none (:func:`_match_transformers`)."""
    return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)


def __getattr__(name: str) -> type[nn.Module]:
    """``CompressedExperts<Base>ForCausalLM`` classes, built on first use (what vLLM's registry imports)."""
    base = name.removeprefix("CompressedExperts")
    if name.startswith("CompressedExperts") and base in FAMILIES:
        cls = model_class(base)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
