"""The expert computation of a compressed-experts block as one opaque operator, for compilers.

What a block computes depends on the data: how many (token, expert) rows each expert gets, which
backend suits the call's size, the grouped products' offsets. Traced by ``torch.compile`` that
is a graph break at every data-dependent step (or an error: ``grouped_mm``'s tracing stub takes
only bfloat16 on CPU, the loop guards on data-dependent sizes), and ``torch.export`` with a
dynamic length would specialise on the path taken by its example. So under a compiler the block
calls ``compressed_experts::experts`` instead: a custom operator whose inside runs the same
backends eagerly and whose outside is only "a tensor shaped like the input". Its gradient is a
second such operator that recomputes the call with autograd on, so compiled training works too.

The operator takes tensors and plain settings only (no module), so an exported program holds
nothing process-specific: the layer's parameters are its inputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers.activations import ACT2CLS, ACT2FN

from . import backends
from .forms import Form, get_form
from .routing import Call

__all__ = ["activation_name", "experts"]

_AUTOGRAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compressed-experts-backward")


def activation_name(act_fn: torch.nn.Module) -> str:
    """transformers' name of an activation module (``"silu"``), for passing it to the operator."""
    for name, cls in ACT2CLS.items():
        if type(act_fn) is (cls[0] if isinstance(cls, tuple) else cls):
            return name
    raise TypeError(f"activation {type(act_fn).__name__} has no transformers name; the operator cannot rebuild it")


@dataclass
class _Block:
    """What the forms and backends read from a block, rebuilt from the operator's inputs."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    form: str
    r: int | None
    path: str
    act: str

    def __post_init__(self) -> None:
        self.act_fn = ACT2FN[self.act]
        self.num_experts, two_i, self.hidden_dim = self.gate_up_proj.shape
        self.intermediate_dim = two_i // 2

    @property
    def form_spec(self) -> Form:
        return get_form(self.form)


def _run(x, top_k_index, top_k_weights, gate_up_proj, down_proj, vectors, *settings) -> torch.Tensor:
    """The call, from the operator's inputs; ``settings`` are the rule (``n_ce``, ``top_p``,
    ``skip_below``, ``kept_experts``) then ``form``, ``r``, ``path`` and ``act``, as the operator takes them."""
    *rule, form, r, path, act = settings
    block = _Block(gate_up_proj, down_proj, form, r, path, act)
    for name, value in zip(block.form_spec.parameters, vectors):
        setattr(block, name, value)
    call = Call(block, x, top_k_index, top_k_weights, *rule)
    return backends.choose(path, call).run(call)


@torch.library.custom_op("compressed_experts::experts", mutates_args=())
def experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    vectors: list[torch.Tensor],
    n_ce: int | None,
    top_p: float | None,
    skip_below: float | None,
    kept_experts: int | None,
    form: str,
    r: int | None,
    path: str,
    act: str,
) -> torch.Tensor:
    """The block's expert output ``[T, H]`` (what ``CompressedExperts._compute`` returns)."""
    settings = (n_ce, top_p, skip_below, kept_experts, form, r, path, act)
    return _run(x, top_k_index, top_k_weights, gate_up_proj, down_proj, vectors, *settings)


@experts.register_fake
def _(x, *_inputs):
    return torch.empty_like(x)


@torch.library.custom_op("compressed_experts::experts_backward", mutates_args=())
def experts_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    vectors: list[torch.Tensor],
    n_ce: int | None,
    top_p: float | None,
    skip_below: float | None,
    kept_experts: int | None,
    form: str,
    r: int | None,
    path: str,
    act: str,
) -> list[torch.Tensor]:
    """Gradients of :func:`experts` for x, the routing weights, both expert weights and each vector,
    by recomputing the call with autograd on (the cost of one more forward, as in checkpointing)."""
    inputs = [t.detach().requires_grad_() for t in (x, top_k_weights, gate_up_proj, down_proj, *vectors)]
    settings = (n_ce, top_p, skip_below, kept_experts, form, r, path, act)
    stream = torch.cuda.current_stream() if grad.is_cuda else None

    def recompute() -> list[torch.Tensor]:
        with torch.cuda.stream(stream) if stream is not None else nullcontext(), torch.enable_grad():
            out = _run(inputs[0], top_k_index, inputs[1], inputs[2], inputs[3], inputs[4:], *settings)
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]

    # An operator's implementation runs with autograd switched off for its thread (torch.enable_grad
    # cannot undo that); a thread of our own starts with it on.
    return _AUTOGRAD_THREAD.submit(recompute).result()


@experts_backward.register_fake
def _(grad, x, top_k_index, top_k_weights, gate_up_proj, down_proj, vectors, *_settings):
    return [torch.empty_like(t) for t in (x, top_k_weights, gate_up_proj, down_proj, *vectors)]


def _setup_context(ctx, inputs, output) -> None:
    x, top_k_index, top_k_weights, gate_up_proj, down_proj, vectors, *settings = inputs
    ctx.save_for_backward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, *vectors)
    ctx.settings = settings


def _backward(ctx, grad):
    x, top_k_index, top_k_weights, gate_up_proj, down_proj, *vectors = ctx.saved_tensors
    g_x, g_weights, g_gate_up, g_down, *g_vectors = experts_backward(
        grad, x, top_k_index, top_k_weights, gate_up_proj, down_proj, vectors, *ctx.settings
    )
    return g_x, None, g_weights, g_gate_up, g_down, g_vectors, *[None] * len(ctx.settings)


experts.register_autograd(_backward, setup_context=_setup_context)
