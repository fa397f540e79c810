"""Side-by-side timings: transformers' own MoE block, and this library's full top-k, top-m and
compressed experts (the paper's ia3 vectors, and the subset and slim forms at r = I/8), on real
layer shapes, the first three also through the fused Triton kernels where they run; the compute
paths forced one by one by call size (:func:`compare_paths`); and end-to-end prefill and decode of
a small model, decode also compiled with a static cache.

Every ratio compares variants measured in the same run on the same machine, on the same
random weights, inputs and routing. Analytic FLOPs and the bytes of expert weights read per
token come with each row so that measured times can be held against the physical floor.
"""

from __future__ import annotations

import copy
import importlib
import json
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, CompileConfig, OlmoeConfig, PhimoeConfig, StaticCache

from .architectures import family_by_name
from .backends import BACKENDS
from .config import CEConfig
from .convert import convert
from .errors import CompressedExpertsError, first_line
from .forms import NEURON_FORMS, TOP_M
from .layer import CompressedExperts
from .routing import Call, main_slots


@dataclass(frozen=True)
class Shape:
    name: str  #: shown in the report's legend
    config: Callable[[], object]  #: a config of the family whose MoE block is timed
    n_ce: int


SHAPES = {
    "olmoe": Shape(
        "OLMoE-1B-7B layer (H 2048, I 1024, E 64, k 8, n_ce 4)",
        lambda: OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8),
        4,
    ),
    "phimoe": Shape(
        "Phi-3.5-MoE layer (H 4096, I 6400, E 16, k 2, n_ce 1)",
        lambda: PhimoeConfig(hidden_size=4096, intermediate_size=6400, num_local_experts=16, num_experts_per_tok=2),
        1,
    ),
}
#: A toy shape, for checking the benchmark itself quickly (tests); not part of the default run.
SHAPES["tiny"] = Shape(
    "toy layer (H 64, I 32, E 8, k 4, n_ce 2)",
    lambda: OlmoeConfig(hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=4),
    2,
)
#: transformers' experts implementations raced for "transformers (fastest)". batched_mm is left out:
#: it gathers every token's expert weights, 34 GB at 512 tokens of the OLMoE shape.
TRANSFORMERS_IMPLEMENTATIONS = ("eager", "grouped_mm")
#: This library's variants that are also timed through the fused Triton kernels, as ``<name>:fused``,
#: where that backend can run (a CUDA device; the CPU only under TRITON_INTERPRET=1, for the tests).
FUSED = ("full", "top-m", "ce", "ce:top-p")
#: The per-token rule of the ``ce:top-p`` variant (the paper's vectors, main experts by ``top_p`` instead of a
#: fixed ``n_ce``). On these random weights routing is nearly uniform, so 0.5 keeps about half of a
#: token's k experts, as the fixed variant does; its costs count the main experts it keeps on each call.
RULE_TOP_P = 0.5


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> str:
    """A one-line description of where the numbers were measured (the card, for a CUDA device)."""
    text = f"{_cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {text}"
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall times of each function, timed in turns (one run of each per round, the order rotating) so
    that a slow spell of a shared machine falls on all of them alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each function, timed in turns (:func:`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, device, repeats, warmup).items()}


def spread(times: list[float]) -> float:
    """How far a variant's repeats scatter, relative to their median: the interquartile range over the
    median (the whole range below four repeats). A ratio of two medians that misses its bound by
    less than the larger spread of the two is within the run's own noise."""
    if len(times) < 2:
        return 0.0
    low, high = (
        statistics.quantiles(times, n=4, method="inclusive")[::2] if len(times) >= 4 else (min(times), max(times))
    )
    return (high - low) / statistics.median(times)


def _with_experts(block: nn.Module, experts: nn.Module) -> nn.Module:
    """A shallow copy of ``block`` (same router, same weights) with another experts module."""
    twin = copy.copy(block)
    twin._modules = dict(block._modules)
    twin.experts = experts
    return twin


class DenseBound(nn.Module):
    """The experts step at the machine's dense matmul rate: every (token, slot) row through ONE
    expert's weights (its own copy, so a backward makes a gradient of one expert's size), so
    that the products have full top-k's FLOPs and shapes but no grouping. What a grouped
    product could reach at most; the distance to it is what grouping costs on this machine
    (at a few tokens the floor is reading the weights instead: the MB column)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(experts.gate_up_proj[0].detach().clone())  # [2I, H]
        self.down = nn.Parameter(experts.down_proj[0].detach().clone())  # [H, I]
        self.act_fn = experts.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        slots = top_k_index.shape[-1]
        rows = hidden_states.repeat_interleave(slots, dim=0)  # [T*k, H], as a grouping's gather makes them
        gate, up = (rows @ self.gate_up.T).chunk(2, dim=-1)
        out = (self.act_fn(gate) * up) @ self.down.T
        weighted = out.view(-1, slots, out.shape[-1]) * top_k_weights.unsqueeze(-1).to(out.dtype)
        return weighted.sum(dim=1).to(hidden_states.dtype)


def _variants(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    config = shape.config()
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    with torch.device(device):
        block = getattr(module, family_by_name(config.model_type).block_class)(config).to(dtype)
    block.eval()  # inference routing: PhiMoE's sparsemixer samples in training mode, changing routing per call
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    compressed = CompressedExperts(block.experts, shape.n_ce)
    with torch.no_grad():
        for vec in (compressed.ce_gate, compressed.ce_up, compressed.ce_down):
            vec.uniform_(0.5, 1.5)
    variants = {}
    for impl in TRANSFORMERS_IMPLEMENTATIONS:
        twin = _with_experts(block, copy.copy(block.experts))
        twin.experts.config = copy.copy(block.experts.config)
        twin.experts.config._experts_implementation = impl
        variants[f"transformers:{impl}"] = twin
    variants["full"] = _with_experts(block, CompressedExperts(block.experts, 0))
    variants["top-m"] = _with_experts(block, CompressedExperts(block.experts, shape.n_ce, TOP_M))
    variants["ce"] = _with_experts(block, compressed)
    ruled = copy.copy(compressed)  # the same vectors; a per-token rule instead of n_ce
    ruled.n_ce, ruled.top_p = None, RULE_TOP_P
    variants["ce:top-p"] = _with_experts(block, ruled)
    for form in NEURON_FORMS:  # weight-chosen neurons: the choice changes nothing about the time
        variants[form] = _with_experts(
            block, CompressedExperts(block.experts, shape.n_ce, form, neurons(block.experts))
        )
    variants["dense"] = _with_experts(block, DenseBound(block.experts))
    # The fused backend's own verdict on a one-token call of this shape: a CUDA device, or the CPU under
    # Triton's interpreter (slow: the tests' toy shape only); Triton installed; these dtypes.
    top_k = config.num_experts_per_tok
    probe = (
        torch.zeros(1, compressed.hidden_dim, dtype=dtype, device=device),
        torch.zeros(1, top_k, dtype=torch.long, device=device),
        torch.full((1, top_k), 1 / top_k, device=device),
    )
    for name in FUSED:
        experts = copy.copy(variants[name].experts)  # the same weights and vectors, its own path
        experts.path = "fused"
        if BACKENDS["fused"].unavailable(Call(experts, *probe, experts.n_ce)) is None:
            variants[f"{name}:fused"] = _with_experts(block, experts)
    return variants


def neurons(experts: nn.Module) -> int:
    """The r of the subset and slim variants: the library's default for these experts."""
    return CEConfig(1, "subset").resolved(experts.down_proj.shape[-1]).r


@dataclass
class Row:
    shape: str
    dtype: str
    tokens: int
    mode: str  # "forward" or "forward+backward"
    variant: str
    ms: float
    gflop_per_token: float  # analytic, expert matmuls only
    expert_mb_per_token: float  # expert weights read, from the experts this routing hit
    spread: float = 0.0  # of the repeats, relative to the median (:func:`spread`)


def _expert_cost(
    block: nn.Module,
    router_attr: str,
    x: torch.Tensor,
    experts_per_token: int | None,
    dtype: torch.dtype,
    top_p: float | None = None,
) -> tuple[float, float]:
    """Analytic GFLOP per token of the expert matmuls, and MB of expert weights read per token
    (the distinct experts this routing hits, shared by all tokens of the call), for the heaviest
    ``experts_per_token`` of each token or, with ``top_p``, the main experts that rule keeps."""
    _, two_i, hidden = block.experts.gate_up_proj.shape
    per_expert = 3 * hidden * (two_i // 2)
    router = getattr(block, router_attr)
    with torch.no_grad():
        _, weights, index = router(x)
    weights, order = weights.sort(dim=-1, descending=True, stable=True)
    index = index.gather(-1, order)
    if top_p is None:
        main = torch.zeros_like(index, dtype=torch.bool)
        main[:, :experts_per_token] = True
    else:
        main = main_slots(weights, top_p, None)
    hit = index[main].unique().numel()
    size = torch.finfo(dtype).bits // 8
    return 2 * per_expert * main.sum(-1).float().mean().item() / 1e9, hit * per_expert * size / x.shape[0] / 1e6


def _runner(block: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "forward":

        def run() -> None:
            with torch.no_grad():
                block(x)

        return run
    x_grad = x.clone().requires_grad_(True)
    probe = torch.randn_like(x)

    def run() -> None:
        (block(x_grad) * probe).sum().backward()
        block.zero_grad(set_to_none=True)

    return run


def bench_layers(
    shapes: Iterable[str],
    dtypes: Iterable[torch.dtype],
    tokens: Iterable[int],
    modes: Iterable[str],
    device: torch.device,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda _: None,
    skip: frozenset[tuple] = frozenset(),
    measured: Callable[[list[Row]], None] = lambda _: None,
) -> list[Row]:
    """Every variant of every (shape, dtype, tokens, mode), timed in turns on shared weights and inputs.

    Groups whose (shape, dtype, tokens, mode) is in ``skip`` are not measured (a resumed run has
    them); ``measured`` is handed each group's rows as soon as they are timed, so a long run
    can be saved as it goes."""
    rows = []
    for shape_key in shapes:
        shape = SHAPES[shape_key]
        config = shape.config()
        top_k, router_attr = config.num_experts_per_tok, family_by_name(config.model_type).router_attr
        for dtype in dtypes:
            dtype_name = str(dtype).removeprefix("torch.")
            if all((shape_key, dtype_name, n, mode) in skip for n in tokens for mode in modes):
                continue
            variants = _variants(shape, dtype, device, seed=0)
            for count in tokens:
                x = torch.randn(1, count, variants["full"].experts.hidden_dim, dtype=dtype, device=device)
                for mode in modes:
                    if (shape_key, dtype_name, count, mode) in skip:
                        continue
                    progress(f"{shape_key}, {dtype_name}, {count} tokens, {mode}")
                    group = []
                    runs = {name: _runner(block, x, mode) for name, block in variants.items()}
                    times = interleaved_times(runs, device, repeats)
                    costs = {
                        n: _expert_cost(variants["full"], router_attr, x.view(-1, x.shape[-1]), n, dtype)
                        for n in (top_k, top_k - shape.n_ce)
                    }
                    costs["top-p"] = _expert_cost(
                        variants["full"], router_attr, x.view(-1, x.shape[-1]), None, dtype, RULE_TOP_P
                    )
                    main, full_cost = costs[top_k - shape.n_ce], costs[top_k]
                    # Auxiliary experts at r/I of an expert (their weights read: those of the experts hit beyond the main ones).
                    share = neurons(variants["full"].experts) / variants["full"].experts.intermediate_dim
                    costs["neurons"] = tuple(m + (f - m) * share for m, f in zip(main, full_cost))
                    one_expert = sum(p.numel() for p in variants["dense"].experts.parameters()) * x.element_size()
                    costs["dense"] = (full_cost[0], one_expert / count / 1e6)  # full's FLOPs, one expert read
                    for name, repeated in times.items():
                        base = name.removesuffix(":fused")  # the same products on another path
                        kind = (
                            "top-p"
                            if base == "ce:top-p"
                            else "neurons"
                            if base in NEURON_FORMS
                            else top_k - shape.n_ce
                            if base in ("top-m", "ce")
                            else base
                            if base == "dense"
                            else top_k
                        )
                        gflop, mb = costs[kind]
                        group.append(
                            Row(
                                shape_key,
                                dtype_name,
                                count,
                                mode,
                                name,
                                statistics.median(repeated) * 1e3,
                                gflop * (3 if mode != "forward" else 1),
                                mb,
                                spread(repeated),
                            )
                        )
                    rows += group
                    measured(group)
            del variants
    return rows


#: The compute paths that :func:`compare_paths` forces in turn.
RACED_PATHS = ("grouped", "decode", "fused")
#: The most tokens :func:`compare_paths` times the decode path at: its kernels read a pair's expert
#: weights for every (token, expert) pair, far behind (and slow to time) at hundreds of tokens.
DECODE_TOKENS = 64


def compare_paths(
    shapes: Iterable[str],
    dtypes: Iterable[torch.dtype],
    tokens: Iterable[int],
    modes: Iterable[str],
    device: torch.device,
    repeats: int = 10,
    line: Callable[[str], None] = print,
) -> list[dict]:
    """Full top-k and compressed experts forced through each of :data:`RACED_PATHS` that can run the
    call, timed in turns per (shape, dtype, tokens, mode): where ``auto`` should take which path
    (decode up to :data:`DECODE_TOKENS` tokens).

    The report is a Markdown table handed to ``line`` a line at a time, each row as soon as it is
    measured (a run cut short keeps what it measured). Each row also gives the largest relative
    difference of a path's output from the grouped path's, so a fast but wrong kernel shows. Returns
    the timings as rows (``variant`` is ``<full or ce>:<path>``); a path that cannot run a call has none."""
    names = [f"{v}:{p}" for v in ("full", "ce") for p in RACED_PATHS]
    line(
        f"Compute paths forced in turn on {machine(device)}: median ms of {repeats} calls of the whole MoE block; "
        f"`-`: the path refused the call (or decode, not timed beyond {DECODE_TOKENS} tokens)."
    )
    line("")
    line(
        "| shape | dtype | tokens | pass | "
        + " | ".join(n.replace(":", " ") + " ms" for n in names)
        + " | fastest full | fastest ce | largest rel. diff to grouped |"
    )
    line("|---" * (len(names) + 7) + "|")
    rows = []
    for shape_key in shapes:
        for dtype in dtypes:
            dtype_name = str(dtype).removeprefix("torch.")
            variants = _variants(SHAPES[shape_key], dtype, device, seed=0)
            blocks = {}
            for name in names:
                variant, path = name.split(":")
                experts = copy.copy(variants[variant].experts)
                experts.path = path
                blocks[name] = _with_experts(variants[variant], experts)
            for count in tokens:
                x = torch.randn(1, count, variants["full"].experts.hidden_dim, dtype=dtype, device=device)
                for mode in modes:
                    runs = {
                        name: _runner(block, x, mode)
                        for name, block in blocks.items()
                        if count <= DECODE_TOKENS or not name.endswith(":decode")
                    }
                    runs = {name: run for name, run in runs.items() if _runs_here(run)}
                    medians = interleaved_medians(runs, device, repeats)
                    with torch.no_grad():
                        out = {name: blocks[name](x).float() for name in runs}
                    diffs = []
                    for name, value in out.items():
                        grouped = out.get(name.split(":")[0] + ":grouped")
                        if grouped is not None and value is not grouped:
                            diffs.append(((value - grouped).norm() / grouped.norm()).item())
                    rows += [
                        {
                            "shape": shape_key,
                            "dtype": dtype_name,
                            "tokens": count,
                            "mode": mode,
                            "variant": n,
                            "ms": t * 1e3,
                        }
                        for n, t in medians.items()
                    ]
                    fastest = {
                        v: min((n for n in medians if n.startswith(v + ":")), key=medians.get, default="-:-")
                        for v in ("full", "ce")
                    }
                    line(
                        f"| {shape_key} | {dtype_name} | {count} | {mode} | "
                        + " | ".join(f"{medians[n] * 1e3:.3f}" if n in medians else "-" for n in names)
                        + f" | {fastest['full'].split(':')[1]} | {fastest['ce'].split(':')[1]} | "
                        + (f"{max(diffs):.1e} |" if diffs else "- |")
                    )
            del variants, blocks
    return rows


def _runs_here(run: Callable[[], None]) -> bool:
    """Run once; False where the forced path refuses the call (a first run, before the timed ones)."""
    try:
        run()
    except CompressedExpertsError:
        return False
    return True


def end_to_end_config() -> OlmoeConfig:
    """A 4-layer model of OLMoE-1B-7B's shape (its real vocabulary and layer sizes)."""
    return OlmoeConfig(
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
    )


#: The end-to-end run's settings, in one place for the measurement and its report.
E2E_DTYPE, E2E_PROMPT, E2E_NEW_TOKENS = "bfloat16", 512, 32
#: torch.compile's mode for the compiled decode: CUDA graphs, so that a decode step is one graph
#: replay instead of hundreds of kernel launches (on the CPU it compiles without graphs).
COMPILE_MODE = "reduce-overhead"


def compiled_generate(model: nn.Module, max_cache_len: int, mode: str = COMPILE_MODE) -> Callable[..., torch.Tensor]:
    """``model.generate`` in its fastest decode mode, transformers' own route to it: a static cache and
    the decode step compiled by ``torch.compile(mode=mode)`` (its ``CompileConfig``; prefill stays
    eager). One cache of ``max_cache_len`` tokens is kept and reset before each call, so that every
    call runs the same compiled step (with CUDA graphs: replays it) instead of recording it again for a
    fresh cache. This library's blocks compile whole through their custom operator (traceable.py)."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    compile_config = CompileConfig(mode=mode)
    compile_config._compile_all_devices = True  # transformers' switch to compile off CUDA too (the CPU: tests)

    def generate(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        cache.reset()
        return model.generate(input_ids, cache=cache, compile_config=compile_config, **kwargs)

    return generate


def greedy(
    generate: Callable[..., torch.Tensor], ids: torch.Tensor, count: int, pad_token_id
) -> Callable[[], torch.Tensor]:
    """``generate`` of exactly ``count`` greedy tokens after ``ids``, ready to time."""
    settings = dict(max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad_token_id)
    return lambda: generate(ids, **settings)


def decode_rates(
    generates: dict[str, Callable[..., torch.Tensor]],
    ids: torch.Tensor,
    new_tokens: int,
    device: torch.device,
    repeats: int,
    pad_token_id,
) -> dict[str, float]:
    """Decode tokens/s of each ``generate`` after the prompts ``ids`` (``[batch, length]``), timed in
    turns: ``new_tokens`` greedy tokens minus a one-token generate, so that the prompt's prefill is
    left out; every sequence of the batch counts."""
    first = interleaved_medians({k: greedy(g, ids, 1, pad_token_id) for k, g in generates.items()}, device, repeats)
    whole = interleaved_medians(
        {k: greedy(g, ids, new_tokens, pad_token_id) for k, g in generates.items()}, device, repeats
    )
    return {k: ids.shape[0] * (new_tokens - 1) / max(whole[k] - first[k], 1e-9) for k in generates}


def bench_end_to_end(
    device: torch.device,
    dtype: torch.dtype,
    prompt: int = E2E_PROMPT,
    new_tokens: int = E2E_NEW_TOKENS,
    repeats: int = 5,
    n_ce: int = 4,
    progress: Callable[[str], None] = lambda _: None,
    config: OlmoeConfig | None = None,
    compiled: bool = False,
) -> dict:
    """Prefill and greedy-decode tokens/s of ``config`` (default :func:`end_to_end_config`), timed in
    turns: transformers' own model, this library's full top-k (n_ce 0) and compressed experts
    (random vectors), all on the same weights.

    With ``compiled``, each model's decode is also timed in its fastest mode (:func:`compiled_generate`),
    as ``decode_tokens_per_s_compiled``, with ``compiled_same_tokens``: whether its greedy tokens are
    the eager ones. ``compiled_decode`` then holds the mode, or the compiler's error: a failure to
    compile is a finding of the run, and the eager figures are kept."""
    torch.manual_seed(0)
    config = config or end_to_end_config()
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    models = {
        "transformers": plain,
        "full": convert(copy.deepcopy(plain), CEConfig(0)),
        "ce": convert(copy.deepcopy(plain), CEConfig(n_ce)),
    }
    with torch.no_grad():
        for layer in models["ce"].modules():
            if isinstance(layer, CompressedExperts):
                for vec in (layer.ce_gate, layer.ce_up, layer.ce_down):
                    vec.uniform_(0.5, 1.5)
    ids = torch.randint(3, config.vocab_size, (1, prompt), device=device)
    short = ids[:, :16]
    eager = {k: m.generate for k, m in models.items()}
    with torch.no_grad():
        progress("end to end: prefill")
        prefill = interleaved_medians({k: (lambda m=m: m(ids)) for k, m in models.items()}, device, repeats)
        progress("end to end: decode")
        rates = decode_rates(eager, short, new_tokens, device, repeats, config.pad_token_id)
        tokens = {k: greedy(g, short, new_tokens, config.pad_token_id)() for k, g in eager.items()}
    result = {k: {"prefill_tokens_per_s": prompt / prefill[k], "decode_tokens_per_s": rates[k]} for k in models}
    if not compiled:
        return result
    progress(f"end to end: decode compiled ({COMPILE_MODE}, static cache; compiling first)")
    fast = {k: compiled_generate(m, short.shape[1] + new_tokens) for k, m in models.items()}
    try:
        with torch.no_grad():
            rates = decode_rates(fast, short, new_tokens, device, repeats, config.pad_token_id)
            same = {
                k: torch.equal(greedy(g, short, new_tokens, config.pad_token_id)(), tokens[k]) for k, g in fast.items()
            }
    except Exception as err:  # whatever the compiler raises: reported with the eager figures, not instead of them
        result["compiled_decode"] = {"mode": COMPILE_MODE, "error": f"{type(err).__name__}: {first_line(err)}"}
        warnings.warn(f"compiled decode failed: {result['compiled_decode']['error']}", stacklevel=2)
        return result
    result["compiled_decode"] = {"mode": COMPILE_MODE}
    for k in models:
        result[k] |= {"decode_tokens_per_s_compiled": rates[k], "compiled_same_tokens": same[k]}
    return result


# ---------------------------------------------------------------- reporting

#: The CPU targets (issues 3 and 20), each against the fastest full top-k of its row (this library's or
#: transformers', whichever is faster): (what, shape, dtype, tokens, mode, variant, bound).
#: Besides these, full top-k / transformers' fastest must be at most 1.0 in every row (see targets()).
TARGETS = (
    ("compressed experts / fastest full top-k", "olmoe", "bfloat16", 1, "forward", "ce", 0.60),
    ("compressed experts / fastest full top-k", "olmoe", "bfloat16", 512, "forward", "ce", 0.60),
    (
        "compressed experts / fastest full top-k, training step",
        "olmoe",
        "bfloat16",
        512,
        "forward+backward",
        "ce",
        0.75,
    ),
)
#: End to end: greedy decode tokens/s of compressed experts over the fastest full top-k model, at least this.
DECODE_SPEEDUP = 1.25
#: The GPU targets (issue 17), in each (shape, dtype) of these shapes that a CUDA result holds:
#: compressed experts at their best (the auto or the fused path) against the fastest full top-k of the
#: row (fused included), at most the bound: (tokens, mode, bound).
GPU_TARGETS = (
    (1, "forward", 0.60),
    (16, "forward", 0.65),
    (512, "forward", 0.65),
    (4096, "forward", 0.65),
    (512, "forward+backward", 0.80),
    (4096, "forward+backward", 0.80),
)
GPU_TARGET_SHAPES = ("olmoe", "phimoe")
#: End to end on a GPU: decode tokens/s of compressed experts over the fastest full top-k model, each
#: in its fastest mode (eager, or compiled with a static cache), at least this.
COMPILED_DECODE_SPEEDUP = 1.3


def _grouped_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows by (shape, dtype, tokens, mode), then by variant."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["tokens"], r["mode"]), {})[r["variant"]] = r
    return groups


def _ordered(groups: dict[tuple, dict[str, dict]]) -> list[tuple]:
    """The report's row order: shape, dtype, pass, then tokens."""
    return sorted(groups, key=lambda k: (k[0], k[1], k[3], k[2]))


def _fastest_transformers(variants: dict[str, dict]) -> dict:
    return min((r for name, r in variants.items() if name.startswith("transformers:")), key=lambda r: r["ms"])


def _best(variants: dict[str, dict], name: str) -> dict:
    """A variant of this library at its fastest: on the auto path, or through the fused kernels where timed."""
    return min((variants[n] for n in (name, f"{name}:fused") if n in variants), key=lambda r: r["ms"])


def _fastest_full_row(variants: dict[str, dict]) -> dict:
    """The fastest full top-k of a row: this library's (``full``, or ``full:fused`` where timed) or
    transformers' fastest experts implementation (what a user would otherwise run)."""
    theirs, ours = _fastest_transformers(variants), _best(variants, "full")
    return ours if ours["ms"] <= theirs["ms"] else theirs


def _fastest_full(variants: dict[str, dict]) -> tuple[str, float]:
    """:func:`_fastest_full_row` as (label, ms)."""
    row = _fastest_full_row(variants)
    if not row["variant"].startswith("transformers:"):
        return row["variant"], row["ms"]
    return f"transformers ({row['variant'].split(':')[1]})", row["ms"]


def _noise(*rows: dict) -> float | None:
    """The larger repeat spread of the rows a ratio divides (None for results from before spreads were kept)."""
    spreads = [r["spread"] for r in rows if "spread" in r]
    return max(spreads) if len(spreads) == len(rows) else None


def _ms(variants: dict[str, dict], variant: str) -> float | None:
    """Time of one variant; "transformers" means the fastest of its experts implementations."""
    if variant == "transformers":
        return _fastest_transformers(variants)["ms"]
    return variants[variant]["ms"] if variant in variants else None


def _costs(variants: dict[str, dict], field: str) -> str:
    """One cost column (GFLOP or MB per token) of full top-k, compressed experts, subset and, where
    timed, compressed experts under the per-token rule."""
    return ", ".join(
        f"{variants[n][field]:{'.3f' if 'gflop' in field else '.1f'}}"
        for n in ("full", "ce", "subset", "ce:top-p")
        if n in variants
    )


def _fastest_decode(figures: dict) -> float:
    """A model's decode tokens/s in its fastest mode measured: eager, or compiled where timed."""
    return max(figures["decode_tokens_per_s"], figures.get("decode_tokens_per_s_compiled", 0.0))


def markdown(result: dict) -> str:
    """One device's results as Markdown: the layer table with ratios, end to end, and the targets."""
    groups = _grouped_rows(result["rows"])
    lines = [f"### {result['device']}: {result['machine']}", "", f"Command: `{result['command']}`", ""]
    lines += [f"- `{key}`: {SHAPES[key].name}" for key in sorted({k[0] for k in groups}) if key in SHAPES]
    lines += [
        "",
        "Ratios are against the fastest full top-k of the row (`fastest`: this library's full top-k, on the "
        "`auto` path or through the fused kernels where they were timed, or transformers' fastest experts "
        "implementation), what a user would otherwise run. `full/transformers`: this library's fastest full "
        "top-k over transformers' fastest.",
        "",
        "| shape | dtype | tokens | pass | transformers (fastest) ms | full ms | top-m ms | ce ms | fastest | "
        f"ce/fastest | top-m/fastest | full/transformers | subset/fastest | slim/fastest | ce top_p {RULE_TOP_P}/fastest | "
        "expert GFLOP/token full, ce, subset, ce top_p | expert MB read/token full, ce, subset, ce top_p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = lambda a, b: "-" if a is None else f"{a / b:.2f}"  # noqa: E731  (results from before the forms lack them)
    for key in _ordered(groups):
        v = groups[key]
        t = {name: _ms(v, name) for name in ("transformers", "full", "top-m", "ce", "subset", "slim", "ce:top-p")}
        best = _fastest_transformers(v)["variant"].split(":")[1]
        fastest, base = _fastest_full(v)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {t['transformers']:.2f} ({best}) | "
            f"{t['full']:.2f} | {t['top-m']:.2f} | {t['ce']:.2f} | {fastest} | {t['ce'] / base:.2f} | "
            f"{t['top-m'] / base:.2f} | {_best(v, 'full')['ms'] / t['transformers']:.2f} | "
            f"{ratio(t['subset'], base)} | {ratio(t['slim'], base)} | {ratio(t['ce:top-p'], base)} | "
            f"{_costs(v, 'gflop_per_token')} | {_costs(v, 'expert_mb_per_token')} |"
        )
    lines += _fused_table(groups)
    lines += _where_the_time_goes(groups)
    lines += _end_to_end_table(result.get("end_to_end"))
    checks = targets(result)
    if checks:
        lines += [
            "",
            "Targets (ratios of this run):",
            "",
            "| target | measured | bound | met | off by | repeat spread |",
            "|---|---|---|---|---|---|",
        ]
        for name, value, bound, kind, ok, noise in checks:
            measured = "not measured" if value is None else f"{value:.3f}"
            off = "" if ok or value is None else f"{value / bound - 1:+.1%}"
            if off and noise is not None and abs(value / bound - 1) <= noise:
                off += " (within the spread)"
            spread_text = "" if noise is None else f"{noise:.1%}"
            lines.append(f"| {name} | {measured} | {kind} {bound} | {'yes' if ok else 'no'} | {off} | {spread_text} |")
        lines += [
            "",
            "`repeat spread`: the larger interquartile range of the two variants' repeats, relative to the "
            "median. A ratio that misses its bound by less than that may be noise: rerun the row with more "
            "--repeats before reading it as a loss. Why a target is missed, from profiles of both sides: "
            "docs/cpu-performance.md (CPU) and docs/kernels.md (GPU).",
        ]
    return "\n".join(lines) + "\n"


def _fused_table(groups: dict[tuple, dict[str, dict]]) -> list[str]:
    """The rows where the fused kernels were timed: each variant through them against itself on the
    ``auto`` path, and compressed experts at their best against the fastest full top-k."""
    keys = [k for k in _ordered(groups) if any(name.endswith(":fused") for name in groups[k])]
    if not keys:
        return []
    lines = [
        "",
        "The fused Triton kernels (path `fused`, same runs): `fused/auto` is a variant through them over the "
        "same variant on the `auto` path (below 1: fused is faster); `best ce/fastest` is compressed experts on "
        "the faster of the two paths over the fastest full top-k of the row.",
        "",
        "| shape | dtype | tokens | pass | "
        + " | ".join([f"{n}:fused ms" for n in FUSED] + [f"fused/auto {n}" for n in FUSED])
        + " | best ce/fastest |",
        "|---|---|---|---|" + "---|" * (2 * len(FUSED) + 1),
    ]
    for key in keys:
        v = groups[key]
        ms = [f"{v[n + ':fused']['ms']:.2f}" if n + ":fused" in v else "-" for n in FUSED]
        over = [f"{v[n + ':fused']['ms'] / v[n]['ms']:.2f}" if n + ":fused" in v else "-" for n in FUSED]
        best = _best(v, "ce")["ms"] / _fastest_full(v)[1]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {' | '.join(ms + over)} | {best:.2f} |")
    return lines


def _where_the_time_goes(groups: dict[tuple, dict[str, dict]]) -> list[str]:
    """The second table: what compressed experts add over their main experts, and how far this
    library's full top-k is from the machine's dense matmul rate at the same FLOPs (the same for the
    fused kernels, where they were timed)."""
    keys = [k for k in _ordered(groups) if "dense" in groups[k]]
    if not keys:
        return []
    fused = any("ce:fused" in groups[k] for k in keys)
    lines = [
        "",
        "Where the time goes (same runs). `ce extra`: (ce - top-m) / ce, the share of a compressed-experts call "
        "spent on what it adds to running the same main experts (averaging the vectors, scaling the inputs, the "
        "gate and up products apart). `GFLOP/s`: expert-matmul FLOPs per second of this library's full top-k, and "
        "of the same products through one expert's weights (`dense`: no grouping, the machine's matmul rate at "
        "these shapes; at a few tokens both are bound by reading weights, not by FLOPs)."
        + (" The `fused` columns: the same through the fused kernels." if fused else ""),
        "",
        "| shape | dtype | tokens | pass | ce extra | full GFLOP/s | dense GFLOP/s | full / dense time |"
        + (" ce:fused extra | full:fused GFLOP/s |" if fused else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if fused else ""),
    ]

    def extra(v: dict[str, dict], suffix: str = "") -> str:
        ce, top_m = v.get("ce" + suffix), v.get("top-m" + suffix)
        return "-" if ce is None or top_m is None else f"{(ce['ms'] - top_m['ms']) / ce['ms']:.0%}"

    def rate(v: dict[str, dict], name: str, tokens: int) -> str:
        return "-" if name not in v else f"{v[name]['gflop_per_token'] * tokens / (v[name]['ms'] / 1e3):.0f}"

    for key in keys:
        v = groups[key]
        line = (
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {extra(v)} | {rate(v, 'full', key[2])} | "
            f"{rate(v, 'dense', key[2])} | {v['full']['ms'] / v['dense']['ms']:.2f} |"
        )
        lines.append(line + (f" {extra(v, ':fused')} | {rate(v, 'full:fused', key[2])} |" if fused else ""))
    return lines


def _end_to_end_table(e2e: dict | None) -> list[str]:
    """Prefill and decode tokens/s of the three models (and compiled decode, where timed)."""
    if not e2e:
        return []
    names = {
        "transformers": "transformers' model",
        "full": "full top-8 (this library)",
        "ce": "compressed experts (n_ce 4)",
    }
    present = [k for k in names if k in e2e]
    fulls = [k for k in ("transformers", "full") if k in e2e]
    baseline = max(fulls, key=lambda k: e2e[k]["decode_tokens_per_s"])
    lines = [
        "",
        f"End to end, 4-layer model of OLMoE-1B-7B's shape ({e2e['dtype']}, prompt {e2e['prompt']}, "
        f"{e2e['new_tokens']} greedy tokens); ce / fastest is against the faster full top-k model at "
        f"decoding, here {names[baseline]} (in the compiled and fastest-mode rows: the faster of that row):",
        "",
        "| | " + " | ".join(names[k] for k in present) + " | ce / fastest |",
        "|---" * (len(present) + 2) + "|",
    ]
    for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        values = " | ".join(f"{e2e[k][metric]:.1f}" for k in present)
        lines.append(f"| {metric.replace('_', ' ')} | {values} | {e2e['ce'][metric] / e2e[baseline][metric]:.2f} |")
    compiled = e2e.get("compiled_decode")
    if compiled and "error" in compiled:
        lines += [
            "",
            f"Compiled decode (torch.compile mode {compiled['mode']}, static cache) failed: {compiled['error']}",
        ]
    elif compiled:
        for label, speed in (
            (
                f"decode tokens per s, compiled ({compiled['mode']}, static cache)",
                lambda f: f["decode_tokens_per_s_compiled"],
            ),
            ("decode tokens per s, fastest mode", _fastest_decode),
        ):
            values = " | ".join(f"{speed(e2e[k]):.1f}" for k in present)
            lines.append(f"| {label} | {values} | {speed(e2e['ce']) / max(speed(e2e[k]) for k in fulls):.2f} |")
        same = " | ".join("yes" if e2e[k]["compiled_same_tokens"] else "no" for k in present)
        lines.append(f"| compiled greedy tokens = eager ones | {same} | |")
    return lines


def targets(result: dict) -> list[tuple[str, float | None, float, str, bool, float | None]]:
    """The targets this result can speak to, with the measured ratios (None: a target of this device
    whose row or run was not measured; never met) and, for the layer ratios, the larger repeat spread
    of the two variants divided (:func:`spread`; None where not kept).

    On the CPU: compressed experts against the fastest full top-k (:data:`TARGETS`, rows not measured
    left out) and end-to-end eager decode against the faster full top-k model (:data:`DECODE_SPEEDUP`).
    On a CUDA device: compressed experts at their best against the fastest full top-k
    (:data:`GPU_TARGETS`, in every shape and dtype the result holds) and end-to-end decode, each model
    in its fastest mode (:data:`COMPILED_DECODE_SPEEDUP`). On both, this library's fastest full top-k
    against transformers' fastest in every row."""
    cpu, cuda = result["device"].startswith("cpu"), result["device"].startswith("cuda")
    groups = _grouped_rows(result["rows"])
    out: list[tuple[str, float | None, float, str, bool, float | None]] = []

    def check(what: str, value: float | None, bound: float, kind: str = "max", noise: float | None = None) -> None:
        ok = value is not None and (value <= bound if kind == "max" else value >= bound)
        out.append((what, value, bound, kind, ok, noise))

    if cpu:
        for what, shape, dtype, tokens, mode, variant, bound in TARGETS:
            variants = groups.get((shape, dtype, tokens, mode))
            if variants:
                fastest = _fastest_full_row(variants)
                check(
                    f"{what} ({shape}, {dtype}, {tokens} tokens, {mode})",
                    variants[variant]["ms"] / fastest["ms"],
                    bound,
                    noise=_noise(variants[variant], fastest),
                )
    if cuda:
        for shape, dtype in sorted({k[:2] for k in groups if k[0] in GPU_TARGET_SHAPES}):
            for tokens, mode, bound in GPU_TARGETS:
                variants = groups.get((shape, dtype, tokens, mode))
                value = noise = None
                if variants:
                    ce, fastest = _best(variants, "ce"), _fastest_full_row(variants)
                    value, noise = ce["ms"] / fastest["ms"], _noise(ce, fastest)
                what = "compressed experts at their best (auto or fused path) / fastest full top-k"
                check(f"{what} ({shape}, {dtype}, {tokens} tokens, {mode})", value, bound, noise=noise)
    if cpu or cuda:
        for shape, dtype, tokens, mode in _ordered(groups):
            variants = groups[(shape, dtype, tokens, mode)]
            ours, theirs = _best(variants, "full"), _fastest_transformers(variants)
            what = f"full top-k / transformers' fastest ({shape}, {dtype}, {tokens} tokens, {mode})"
            check(what, ours["ms"] / theirs["ms"], 1.0, noise=_noise(ours, theirs))
    e2e = result.get("end_to_end")
    fulls = [k for k in ("transformers", "full") if e2e and k in e2e]
    if cpu and e2e:
        value = e2e["ce"]["decode_tokens_per_s"] / max(e2e[k]["decode_tokens_per_s"] for k in fulls)
        check(
            "decode tokens/s, compressed experts / fastest full top-k model (end to end)", value, DECODE_SPEEDUP, "min"
        )
    if cuda and e2e:
        timed = all("decode_tokens_per_s_compiled" in e2e[k] for k in ["ce", *fulls])
        value = _fastest_decode(e2e["ce"]) / max(_fastest_decode(e2e[k]) for k in fulls) if timed else None
        what = "decode tokens/s, compressed experts / fastest full top-k model, each in its fastest mode (end to end)"
        check(what, value, COMPILED_DECODE_SPEEDUP, "min")
    return out


def _merge(stored: dict, new: dict) -> dict:
    """``stored`` with the rows and end-to-end figures that ``new`` measured replaced by ``new``'s
    (measured on the same machine; from another machine, ``new`` replaces it whole)."""
    if stored["machine"] != new["machine"]:  # check_mergeable let it through: it measured every row
        return new
    key = lambda r: (r["shape"], r["dtype"], r["tokens"], r["mode"], r["variant"])  # noqa: E731
    fresh = {key(r) for r in new["rows"]}
    merged = dict(stored, machine=new["machine"], repeats=new["repeats"])
    merged["rows"] = [r for r in stored["rows"] if key(r) not in fresh] + new["rows"]
    commands = [c for c in (stored.get("command"), new.get("command")) if c]
    merged["command"] = " ; ".join(dict.fromkeys(" ; ".join(commands).split(" ; ")))
    if "end_to_end" in new:
        merged["end_to_end"] = new["end_to_end"]
    return merged


def read_result(path: Path) -> dict:
    """One stored benchmark result, checked to be one: JSON (not truncated) that the report can be
    written from. Refused with the file named, before anything is measured (:func:`stored_results`)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompressedExpertsError(
            f"{path} is not JSON ({first_line(err)}): a truncated or damaged benchmark result? Move it out of "
            f"the folder (or delete it) and run again",
            settings=("out_dir",),
        ) from None
    problem = None
    row_fields = {"shape", "dtype", "tokens", "mode", "variant", "ms"}
    if not isinstance(result, dict) or not {"device", "machine", "rows"} <= set(result):
        problem = "it lacks device, machine and rows"
    elif not (isinstance(result["device"], str) and isinstance(result["machine"], str)):
        problem = "its device and machine are not texts"
    elif not isinstance(result["rows"], list) or not all(
        isinstance(r, dict) and row_fields <= set(r) and isinstance(r["ms"], (int, float)) for r in result["rows"]
    ):
        problem = f"its rows are not a list of timings ({', '.join(sorted(row_fields))})"
    if problem is not None:
        raise CompressedExpertsError(
            f"{path} is not a result of compressed-experts bench: {problem}. The folder holds only bench "
            f"results (every *.json but vllm-* and models-* goes into the report): move it, or choose another out_dir",
            settings=("out_dir",),
        )
    return result


#: Results of whole models share the folder under these prefixes, by engine (``bench --engine vllm``:
#: one model's variants; ``--engine transformers``: saved models compared); the layer report is made
#: of the other ``*.json``.
ENGINE_RESULTS = {"vllm": "vllm-", "transformers": "models-"}


def engine_results_name(engine: str, device: str, models: Sequence[str] = ()) -> str:
    """The file a whole-model result is saved as: ``vllm-<device>.json``, or with the compared models'
    folder names after the device (``models-<device>-<model>-<model>.json``), so that comparing other
    models does not overwrite an earlier comparison."""
    parts = [device, *(Path(m.rstrip("/\\")).name or m for m in models)]
    return ENGINE_RESULTS[engine] + "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts) + ".json"


def stored_results(directory: Path) -> dict[Path, dict]:
    """Every layer result in ``directory`` (each ``*.json`` but the engines'), each checked by :func:`read_result`."""
    if not directory.is_dir():
        return {}
    files = [p for p in sorted(directory.glob("*.json")) if not p.name.startswith(tuple(ENGINE_RESULTS.values()))]
    return {p: read_result(p) for p in files}


def write_report(result: dict | None, directory: Path, document: Path) -> None:
    """Store ``result`` (if any) as ``directory/<device>.json`` and regenerate ``document`` from every stored result.

    Every stored result is read and checked first, so a damaged file is refused before this run's
    result replaces anything (the command checks them before measuring, too)."""
    if directory.exists() and not directory.is_dir():
        raise CompressedExpertsError(f"out_dir {directory} is a file; give a folder", settings=("out_dir",))
    stored = stored_results(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if result is not None:
        path = directory / f"{result['device']}.json"
        if path in stored:  # a partial run (some shapes, or end to end only) updates what it measured
            result = _merge(stored[path], result)
        path.write_text(json.dumps(result, indent=1))
        stored[path] = result
    results = [stored[p] for p in sorted(stored)]
    if not results:
        raise CompressedExpertsError(f"no benchmark results in {directory}: run compressed-experts bench first")
    parts = [
        "# Benchmarks",
        "",
        "Generated by `compressed-experts bench` from the JSON files in "
        f"`{directory.as_posix()}/`; each section was measured on the machine it names, all variants of a row "
        "in the same run. Times are medians of the stated repeats after warm-up; random weights and inputs. "
        "GPU sections appear only where a GPU run was made.",
        "",
    ]
    document.write_text("\n".join(parts) + "\n".join(markdown(r) for r in results))


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA where there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_key(dev: torch.device) -> str:
    """The name of a device's results file: ``cpu-<model>`` or ``cuda-<card>``, so that machines of
    different CPU models (or cards) each keep their own section of the report."""
    name = _cpu_model() if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    return f"{dev.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_mergeable(directory: Path, dev: torch.device, keys: set[tuple], end_to_end: bool) -> None:
    """Refuse, before anything is measured, a run that would put two machines in one table: a run on
    another machine than the stored results must measure every row they hold (it then replaces them)."""
    path = directory / f"{device_key(dev)}.json"
    stored_results(directory)  # every file the report merges must be readable now, not after measuring
    if not path.is_file():
        return
    stored = read_result(path)
    here = machine(dev)
    if stored["machine"] == here:
        return
    held = {(r["shape"], r["dtype"], r["tokens"], r["mode"]) for r in stored["rows"]}
    if held - keys or ("end_to_end" in stored and not end_to_end):
        raise CompressedExpertsError(
            f"{path} was measured on {stored['machine']}; this is {here}. A partial run would put two machines "
            f"in one table: measure every row it holds (the default shapes, dtypes, tokens and modes, end to "
            f"end included), or write to another out_dir",
            settings=("out_dir",),
        )


def partial_path(directory: Path, dev: torch.device) -> Path:
    """Where a run keeps what it has measured so far (not ``*.json``: the report never reads it)."""
    return directory / f"{device_key(dev)}.json.partial"


def _earlier(path: Path, here: str, repeats: int) -> dict:
    """The rows an interrupted run saved in ``path``, checked to be resumable by this one."""
    if not path.is_file():
        raise CompressedExpertsError(f"nothing to resume: {path} does not exist; run without --resume")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        machine_, repeats_ = saved["machine"], saved["repeats"]
        if not all(isinstance(r, dict) and isinstance(r["ms"], (int, float)) for r in saved["rows"]):
            raise TypeError("its rows are not timings")
    except (ValueError, KeyError, TypeError) as err:
        raise CompressedExpertsError(
            f"{path} is not a run's saved progress ({first_line(err)}); delete it and run without --resume"
        ) from None
    if (machine_, repeats_) != (here, repeats):
        raise CompressedExpertsError(
            f"{path} was measured on {machine_} with {repeats_} repeats; this run is on {here} with {repeats}. "
            f"Rows of both in one table would not compare: run without --resume to start again"
        )
    return saved


def run(
    device: str = "auto",
    shapes=("olmoe", "phimoe"),
    dtypes=("bfloat16", "float32"),
    tokens=(1, 16, 512),
    modes=("forward", "forward+backward"),
    repeats: int = 5,
    end_to_end: bool = True,
    command: str = "",
    progress: Callable[[str], None] = lambda _: None,
    partial: Path | None = None,
    resume: bool = False,
    compiled_decode: bool | None = None,
) -> dict:
    """Run the layer benchmark (and the end-to-end one) and return the result as a JSON-ready dict.

    ``compiled_decode`` (None: on CUDA only) also times end-to-end decode compiled, with a static cache
    (:func:`bench_end_to_end`): CUDA graphs, what that mode is for, exist on CUDA only.

    With ``partial``, the result so far is written there (atomically) after every row and after the
    end-to-end part, so an interrupted run loses at most the row it was timing; ``resume`` takes the
    rows (and end-to-end figures) a run of the same machine and repeats saved there and measures
    only the rest. Without ``resume`` an earlier ``partial`` is started afresh: code may have changed
    since, and rows of two versions must not share a table."""
    from .checkpoint import write_atomic

    dev = resolve_device(device)
    here = machine(dev)
    result = {"device": device_key(dev), "machine": here, "command": command, "repeats": repeats, "rows": []}
    if resume:
        if partial is None:
            raise CompressedExpertsError("resume needs the partial file of the interrupted run")
        earlier = _earlier(partial, here, repeats)
        result["rows"] = earlier["rows"]
        if "end_to_end" in earlier:
            result["end_to_end"] = earlier["end_to_end"]

    def save(group: list[Row] = ()) -> None:
        result["rows"] += [asdict(r) for r in group]
        if partial is not None:
            write_atomic(partial, json.dumps(result, indent=1))

    done = frozenset((r["shape"], r["dtype"], r["tokens"], r["mode"]) for r in result["rows"])
    with warnings.catch_warnings():  # training steps in 16 bits are timed here, not trained: no advice wanted
        warnings.filterwarnings("ignore", message="compressed experts held in")
        bench_layers(
            shapes, [getattr(torch, d) for d in dtypes], tokens, modes, dev, repeats, progress, done, measured=save
        )
    if end_to_end and "end_to_end" not in result:
        result["end_to_end"] = {
            "dtype": E2E_DTYPE,
            "prompt": E2E_PROMPT,
            "new_tokens": E2E_NEW_TOKENS,
            **bench_end_to_end(
                dev,
                getattr(torch, E2E_DTYPE),
                repeats=repeats,
                progress=progress,
                compiled=dev.type == "cuda" if compiled_decode is None else compiled_decode,
            ),
        }
        save()
    return result
