"""The compressed-experts experts module: split main/auxiliary, ask the form, ask a backend.

It replaces the ``experts`` submodule of a transformers MoE block and takes the same call,
``experts(hidden_states, top_k_index, top_k_weights)``. The block's own forward is left as it
is, so each family's router (softmax/top-k, renormalisation, PhiMoE's sparsemixer,
DeepSeek's grouped routing) and shared experts run exactly as before; this module only
changes what is done with the routing it is handed. It knows nothing of any one family, form
(:mod:`compressed_experts.forms`) or compute backend (:mod:`compressed_experts.backends`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import backends, traceable
from .config import CEConfig
from .errors import CompressedExpertsError
from .forms import CE_PARAMETERS, Form, get_form, is_compressed_expert
from .routing import Call, Ruled, check_rule, split_routing

__all__ = [
    "CE_PARAMETERS",
    "CompressedExperts",
    "CompressedVectors",
    "is_compressed_expert",
    "set_compute_path",
    "split_routing",
]


class CompressedVectors(nn.Module):
    """The parameters a form adds to a block (``ce_gate``, ``ce_up``, ...), in a submodule of their own.

    A submodule so that tools which train or save *modules* can name exactly these and nothing
    else: PEFT's ``modules_to_save=["compressed"]`` trains and saves them in an adapter (a few
    hundred kilobytes) instead of every expert weight. The block reads them through attribute
    access (``experts.compressed.ce_gate``), so when PEFT wraps this module the block computes
    with the adapter's copy.
    """

    def forward(self) -> None:  # never called: the block reads the parameters
        raise TypeError("CompressedVectors holds parameters; the CompressedExperts block reads them")


class CompressedExperts(Ruled, nn.Module):
    """Run the ``m = k - n_ce`` heaviest routed experts in full; stand in for the rest by ``form``.

    Instead of ``n_ce`` (None then), a per-token rule chooses how many of each token's experts are
    main: ``top_p`` (the fewest heaviest covering that share of its routing weight) or
    ``skip_below`` (those weighing at least that fraction of its top weight); see
    :class:`~compressed_experts.config.CEConfig`. Or ``kept_experts``, what
    :func:`compressed_experts.prune` gives a model pruned with stand-ins: experts ``0 ..
    kept_experts - 1`` run in full, and only the others (the removed ones) have compressed experts,
    which stand in for them; once :meth:`remove_experts` has dropped their full weights, the block
    holds ``kept_experts`` rows of them while its router still picks among all ``num_experts``.

    Parameters are the original expert weights (shared, not copied) plus what the form adds
    (:mod:`compressed_experts.forms`): ``ia3`` three vectors per expert, ``ce_gate`` ``[E, H]``,
    ``ce_up`` ``[E, H]`` and ``ce_down`` ``[E, I]``, starting at 1.0; ``none`` and ``subset``
    nothing; ``slim`` a gated MLP of ``r`` neurons per expert, ``ce_gate_up_proj`` ``[E, 2r, H]``
    and ``ce_down_proj`` ``[E, H, r]``.
    """

    def __init__(
        self,
        experts: nn.Module,
        n_ce: int | None,
        form: str = "ia3",
        r: int | None = None,
        *,
        top_p: float | None = None,
        skip_below: float | None = None,
        kept_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = experts.gate_up_proj  # [E, 2I, H], gate rows first
        self.down_proj = experts.down_proj  # [E, H, I]
        self.act_fn = experts.act_fn
        # The router's expert count: the weights may hold fewer rows (remove_experts).
        self.num_experts, two_i, self.hidden_dim = self.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.n_ce = n_ce
        self.top_p = top_p
        self.skip_below = skip_below
        self.kept_experts = kept_experts
        self.form = form
        spec = self.form_spec
        self.r = r if spec.takes_r else None
        if spec.takes_r and not (isinstance(r, int) and 1 <= r <= self.intermediate_dim):
            raise CompressedExpertsError(f"form {form} needs r between 1 and {self.intermediate_dim}, got {r!r}")
        check_rule(n_ce, top_p, skip_below, kept_experts)
        if kept_experts is not None and kept_experts >= self.num_experts:
            raise CompressedExpertsError(
                f"kept_experts={kept_experts} keeps every one of the block's {self.num_experts} experts: nothing is "
                f"removed for compressed experts to stand in for",
                settings=("kept_experts",),
            )
        self.path = "auto"  # compute backend of the expert products, see set_compute_path
        # Distillation (training only): when on, each training forward also runs the full top-k
        # block without gradients and leaves the relative squared distance to it here.
        self.distill = False
        self.distill_loss: torch.Tensor | None = None
        # The plain checkpoint this block was converted from in memory (set by convert; None when
        # loaded converted): a PEFT adapter trained on it names that plain checkpoint as its base.
        self.converted_from: str | None = None
        self.compressed = CompressedVectors()
        for name, value in spec.initial_parameters(self).items():
            self.compressed.register_parameter(name, nn.Parameter(value))

    def __getattr__(self, name: str):
        """``layer.ce_gate`` and the like: the form's parameters, read from ``self.compressed`` (or,
        under PEFT, from the active adapter's copy of it)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in CE_PARAMETERS and "compressed" in self._modules:
                return getattr(self._modules["compressed"], name)
            raise

    def __setattr__(self, name: str, value) -> None:
        if name in CE_PARAMETERS and "compressed" in self.__dict__.get("_modules", {}):
            setattr(self._modules["compressed"], name, value)
        else:
            super().__setattr__(name, value)

    @property
    def form_spec(self) -> Form:
        """The :class:`~compressed_experts.forms.base.Form` behind ``self.form``."""
        return get_form(self.form)

    @property
    def ce_config(self) -> CEConfig:
        """This block's settings (rule, form and ``r``) as a :class:`CEConfig` (validated)."""
        return CEConfig(
            self.n_ce, self.form, self.r, top_p=self.top_p, skip_below=self.skip_below, kept_experts=self.kept_experts
        )

    @property
    def removed(self) -> bool:
        """Whether the full weights of the experts past ``kept_experts`` are gone (:meth:`remove_experts`)."""
        return self.gate_up_proj.shape[0] < self.num_experts

    @torch.no_grad()
    def remove_experts(self) -> None:
        """Drop the full weights of the experts that ``kept_experts`` leaves out, freeing their memory.

        Their compressed experts stay (they stand in for them); what the block computes is
        unchanged, as under ``kept_experts`` no token runs those experts in full. What needs them
        (:meth:`full`, and so :func:`compressed_experts.fit` and distillation) is refused afterwards.
        """
        if self.kept_experts is None:
            raise CompressedExpertsError(
                "only a block under kept_experts (pruned with stand-ins) can drop experts' weights"
            )
        if not self.removed:
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(self, name)
                setattr(self, name, nn.Parameter(weight[: self.kept_experts].clone(), weight.requires_grad))

    def extra_repr(self) -> str:
        neurons = f", r={self.r}" if self.r is not None else ""
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, {self.ce_config.rule}, form={self.form}{neurons}, "
            f"path={self.path}"
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.training and self.compresses and torch.is_grad_enabled():
            self._warn_if_untrainable()
            self._warn_if_adapter_misnames_base()
        out = self._compute(hidden_states, top_k_index, top_k_weights)
        if self.distill and self.training and self.compresses:
            with torch.no_grad():
                target = self.full(hidden_states, top_k_index, top_k_weights).float()
            # Relative to the target's mean square, so one weight means the same in every block and model.
            self.distill_loss = (out.float() - target).square().mean() / target.square().mean().clamp_min(1e-12)
        return out

    def _warn_if_untrainable(self) -> None:
        """Warn (once per place) when trainable compressed experts are held in a 16-bit float: their
        steps of about 2e-5 near 1.0 round away there, so any trainer or loop would leave them as they are."""
        low = {
            str(p.dtype).removeprefix("torch.")
            for n, p in self.named_parameters()
            if is_compressed_expert(n) and p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
        }
        if low:
            warnings.warn(
                f"compressed experts held in {', '.join(sorted(low))} are being trained: optimizer steps this "
                f"small round away near 1.0, so they will not move. Call "
                f"compressed_experts.float32_compressed_experts(model) before building the optimizer "
                f"(compressed-experts train --precision bf16 does this)",
                stacklevel=3,
            )

    def _warn_if_adapter_misnames_base(self) -> None:
        """Warn when a PEFT adapter trains these compressed experts on a model converted in memory:
        the adapter will name the plain checkpoint as its base, and PEFT's own loaders would put it
        back on that plain model, without compressed experts and without a word."""
        if self.converted_from is not None and hasattr(self._modules["compressed"], "modules_to_save"):
            if self.kept_experts is not None:  # no loader can rebuild a pruning from the plain model
                warnings.warn(
                    f"compressed experts are being trained in a PEFT adapter on a model pruned with stand-ins in "
                    f"memory from {self.converted_from}: the adapter will name that unpruned model as its base, "
                    f"which nothing can load it onto. Save the pruned model first (prune --stand-in, or "
                    f"save_pretrained) and train on that directory",
                    stacklevel=3,
                )
                return
            warnings.warn(
                f"compressed experts are being trained in a PEFT adapter on a model converted in memory from "
                f"{self.converted_from}: the adapter will name that plain model as its base, so "
                f"AutoPeftModelForCausalLM would load it without compressed experts. Load the adapter with "
                f"compressed_experts.from_pretrained(ADAPTER_DIR, {self.ce_config.rule}), or save the converted model "
                f"first and train on that directory",
                stacklevel=3,
            )

    def full(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The full top-k output, every routed expert run in full: what the compressed experts stand in for."""
        if self.removed:
            raise pruned_error(self.ce_config)
        return self._compute(hidden_states, top_k_index, top_k_weights, full=True)

    def _compute(self, hidden_states, top_k_index, top_k_weights, full: bool = False) -> torch.Tensor:
        # n_ce, top_p, skip_below, kept_experts
        rule = (0, None, None, None) if full else (self.n_ce, self.top_p, self.skip_below, self.kept_experts)
        if torch.compiler.is_compiling():  # one opaque operator: no graph break, any length (traceable.py)
            vectors = [getattr(self, name) for name in self.form_spec.parameters]
            return traceable.experts(
                hidden_states,
                top_k_index,
                top_k_weights,
                self.gate_up_proj,
                self.down_proj,
                vectors,
                *rule,
                self.form,
                self.r,
                self.path,
                traceable.activation_name(self.act_fn),
            )
        call = Call(self, hidden_states, top_k_index, top_k_weights, *rule)
        return backends.choose(self.path, call).run(call)


def pruned_error(config: CEConfig) -> CompressedExpertsError:
    """What fitting or distilling a model pruned with stand-ins is refused with (the full top-k output they
    need is gone with the removed experts' weights)."""
    return CompressedExpertsError(
        f"this model was pruned with stand-ins ({config.rule}): the removed experts' weights are gone, so there "
        f"is no full top-k output to fit or distill towards. Fit the stand-ins while pruning (prune --stand-in "
        f"--fit-steps N, on the unpruned model); fine-tuning (train, without --distill-weight) trains them further"
    )


def set_compute_path(model: nn.Module, path: str) -> None:
    """Force how every compressed-experts block of ``model`` computes its experts.

    ``"auto"`` (the default) picks per call, in :data:`compressed_experts.backends.AUTO`'s order:
    the fused ``decode`` kernels on CUDA for inference calls of at most twice as many main
    (token, expert) rows as experts (ia3 and top-m); ``grouped`` (``grouped_mm``) where the build
    and device take the operands, except for inference on CPU that is decode-sized (rows at most a
    quarter of the experts) or large (64 rows per expert and more); else ``loop``. ``"grouped"``,
    ``"loop"`` and ``"decode"`` force one (an error where it cannot run); ``"eager"`` is the
    per-token reference, for checking.
    """
    backends.check_path(path)
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if not layers:
        raise CompressedExpertsError("this model has no compressed-experts blocks: convert it first")
    for layer in layers:
        layer.path = path
