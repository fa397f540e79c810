"""Side-by-side timings: transformers' own MoE block, and this library's full top-k, top-m and
compressed experts (the paper's ia3 vectors, and the subset and slim forms at r = I/8), on real
layer shapes; plus end-to-end prefill and decode of a small model.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, OlmoeConfig, PhimoeConfig

from .architectures import family_by_name
from .config import CEConfig
from .convert import convert
from .errors import CompressedExpertsError, first_line
from .forms import NEURON_FORMS, TOP_M
from .layer import CompressedExperts


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


def machine(device: torch.device | None = None) -> str:
    """A one-line description of where the numbers were measured (the card, for a CUDA device)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device is not None and device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {text}"
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each function, timed in turns (one run of each per round, the order
    rotating) so that a slow spell of a shared machine falls on all of them alike."""
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
    return {name: statistics.median(t) for name, t in times.items()}


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
    for form in NEURON_FORMS:  # weight-chosen neurons: the choice changes nothing about the time
        variants[form] = _with_experts(
            block, CompressedExperts(block.experts, shape.n_ce, form, neurons(block.experts))
        )
    variants["dense"] = _with_experts(block, DenseBound(block.experts))
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


def _expert_cost(
    block: nn.Module, router_attr: str, x: torch.Tensor, experts_per_token: int, dtype: torch.dtype
) -> tuple[float, float]:
    """Analytic GFLOP per token of the expert matmuls, and MB of expert weights read per token
    (the distinct experts this routing hits, shared by all tokens of the call)."""
    _, two_i, hidden = block.experts.gate_up_proj.shape
    per_expert = 3 * hidden * (two_i // 2)
    router = getattr(block, router_attr)
    with torch.no_grad():
        _, weights, index = router(x)
    top = index.gather(-1, weights.argsort(-1, descending=True))[:, :experts_per_token]
    hit = top.unique().numel()
    size = torch.finfo(dtype).bits // 8
    return 2 * per_expert * experts_per_token / 1e9, hit * per_expert * size / x.shape[0] / 1e6


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
                    medians = interleaved_medians(runs, device, repeats)
                    costs = {
                        n: _expert_cost(variants["full"], router_attr, x.view(-1, x.shape[-1]), n, dtype)
                        for n in (top_k, top_k - shape.n_ce)
                    }
                    main, full_cost = costs[top_k - shape.n_ce], costs[top_k]
                    # Auxiliary experts at r/I of an expert (their weights read: those of the experts hit beyond the main ones).
                    share = neurons(variants["full"].experts) / variants["full"].experts.intermediate_dim
                    costs["neurons"] = tuple(m + (f - m) * share for m, f in zip(main, full_cost))
                    one_expert = sum(p.numel() for p in variants["dense"].experts.parameters()) * x.element_size()
                    costs["dense"] = (full_cost[0], one_expert / count / 1e6)  # full's FLOPs, one expert read
                    for name, seconds in medians.items():
                        kind = (
                            "neurons"
                            if name in NEURON_FORMS
                            else top_k - shape.n_ce
                            if name in ("top-m", "ce")
                            else name
                            if name == "dense"
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
                                seconds * 1e3,
                                gflop * (3 if mode != "forward" else 1),
                                mb,
                            )
                        )
                    rows += group
                    measured(group)
            del variants
    return rows


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


def bench_end_to_end(
    device: torch.device,
    dtype: torch.dtype,
    prompt: int = E2E_PROMPT,
    new_tokens: int = E2E_NEW_TOKENS,
    repeats: int = 5,
    n_ce: int = 4,
    progress: Callable[[str], None] = lambda _: None,
    config: OlmoeConfig | None = None,
) -> dict:
    """Prefill and greedy-decode tokens/s of ``config`` (default :func:`end_to_end_config`), timed in
    turns: transformers' own model, this library's full top-k (n_ce 0) and compressed experts
    (random vectors), all on the same weights."""
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

    def generate(model, count):
        return lambda: model.generate(
            short, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=config.pad_token_id
        )

    with torch.no_grad():
        progress("end to end: prefill")
        prefill = interleaved_medians({k: (lambda m=m: m(ids)) for k, m in models.items()}, device, repeats)
        progress("end to end: decode")
        first = interleaved_medians({k: generate(m, 1) for k, m in models.items()}, device, repeats)
        decode = interleaved_medians({k: generate(m, new_tokens) for k, m in models.items()}, device, repeats)
    # The decode rate leaves out the short prompt's prefill (timed as a one-token generate).
    return {
        k: {
            "prefill_tokens_per_s": prompt / prefill[k],
            "decode_tokens_per_s": (new_tokens - 1) / max(decode[k] - first[k], 1e-9),
        }
        for k in models
    }


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


def _grouped_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows by (shape, dtype, tokens, mode), then by variant."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["tokens"], r["mode"]), {})[r["variant"]] = r
    return groups


def _fastest_transformers(variants: dict[str, dict]) -> dict:
    return min((r for name, r in variants.items() if name.startswith("transformers:")), key=lambda r: r["ms"])


def _fastest_full(variants: dict[str, dict]) -> tuple[str, float]:
    """The fastest full top-k of a row: this library's or transformers' fastest experts implementation
    (what a user would otherwise run), as (label, ms)."""
    theirs = _fastest_transformers(variants)
    if variants["full"]["ms"] <= theirs["ms"]:
        return "full", variants["full"]["ms"]
    return f"transformers ({theirs['variant'].split(':')[1]})", theirs["ms"]


def _ms(variants: dict[str, dict], variant: str) -> float | None:
    """Time of one variant; "transformers" means the fastest of its experts implementations."""
    if variant == "transformers":
        return _fastest_transformers(variants)["ms"]
    return variants[variant]["ms"] if variant in variants else None


def _costs(variants: dict[str, dict], field: str) -> str:
    """One cost column (GFLOP or MB per token) of full top-k, compressed experts and subset."""
    return ", ".join(
        f"{variants[n][field]:{'.3f' if 'gflop' in field else '.1f'}}"
        for n in ("full", "ce", "subset")
        if n in variants
    )


def markdown(result: dict) -> str:
    """One device's results as Markdown: the layer table with ratios, end to end, and the targets."""
    groups = _grouped_rows(result["rows"])
    lines = [f"### {result['device']}: {result['machine']}", "", f"Command: `{result['command']}`", ""]
    lines += [f"- `{key}`: {SHAPES[key].name}" for key in sorted({k[0] for k in groups}) if key in SHAPES]
    lines += [
        "",
        "Ratios are against the fastest full top-k of the row (`fastest`: this library's full top-k or "
        "transformers' fastest experts implementation), what a user would otherwise run.",
        "",
        "| shape | dtype | tokens | pass | transformers (fastest) ms | full ms | top-m ms | ce ms | fastest | "
        "ce/fastest | top-m/fastest | full/transformers | subset/fastest | slim/fastest | "
        "expert GFLOP/token full, ce, subset | expert MB read/token full, ce, subset |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = lambda a, b: "-" if a is None else f"{a / b:.2f}"  # noqa: E731  (results from before the forms lack them)
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3], k[2])):
        v = groups[key]
        t = {name: _ms(v, name) for name in ("transformers", "full", "top-m", "ce", "subset", "slim")}
        best = _fastest_transformers(v)["variant"].split(":")[1]
        fastest, base = _fastest_full(v)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {t['transformers']:.2f} ({best}) | "
            f"{t['full']:.2f} | {t['top-m']:.2f} | {t['ce']:.2f} | {fastest} | {t['ce'] / base:.2f} | "
            f"{t['top-m'] / base:.2f} | {t['full'] / t['transformers']:.2f} | "
            f"{ratio(t['subset'], base)} | {ratio(t['slim'], base)} | "
            f"{_costs(v, 'gflop_per_token')} | {_costs(v, 'expert_mb_per_token')} |"
        )
    lines += _where_the_time_goes(groups)
    e2e = result.get("end_to_end")
    if e2e:
        names = {
            "transformers": "transformers' model",
            "full": "full top-8 (this library)",
            "ce": "compressed experts (n_ce 4)",
        }
        present = [k for k in names if k in e2e]
        baseline = max((k for k in ("transformers", "full") if k in e2e), key=lambda k: e2e[k]["decode_tokens_per_s"])
        lines += [
            "",
            f"End to end, 4-layer model of OLMoE-1B-7B's shape ({e2e['dtype']}, prompt {e2e['prompt']}, "
            f"{e2e['new_tokens']} greedy tokens); ce / fastest is against the faster full top-k model at "
            f"decoding, here {names[baseline]}:",
            "",
            "| | " + " | ".join(names[k] for k in present) + " | ce / fastest |",
            "|---" * (len(present) + 2) + "|",
        ]
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            values = " | ".join(f"{e2e[k][metric]:.1f}" for k in present)
            lines.append(f"| {metric.replace('_', ' ')} | {values} | {e2e['ce'][metric] / e2e[baseline][metric]:.2f} |")
    checks = targets(result)
    if checks:
        lines += [
            "",
            "Targets (ratios of this run):",
            "",
            "| target | measured | bound | met | off by |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {value:.3f} | {kind} {bound} | {'yes' if ok else 'no'} | {'' if ok else f'{value / bound - 1:+.1%}'} |"
            for name, value, bound, kind, ok in checks
        ]
    return "\n".join(lines) + "\n"


def _where_the_time_goes(groups: dict[tuple, dict[str, dict]]) -> list[str]:
    """The second table: what compressed experts add over their main experts, and how far this
    library's full top-k is from the machine's dense matmul rate at the same FLOPs."""
    keys = [k for k in sorted(groups, key=lambda k: (k[0], k[1], k[3], k[2])) if "dense" in groups[k]]
    if not keys:
        return []
    lines = [
        "",
        "Where the time goes (same runs). `ce extra`: (ce - top-m) / ce, the share of a compressed-experts call "
        "spent on what it adds to running the same main experts (averaging the vectors, scaling the inputs, the "
        "gate and up products apart). `GFLOP/s`: expert-matmul FLOPs per second of this library's full top-k, and "
        "of the same products through one expert's weights (`dense`: no grouping, the machine's matmul rate at "
        "these shapes; at a few tokens both are bound by reading weights, not by FLOPs).",
        "",
        "| shape | dtype | tokens | pass | ce extra | full GFLOP/s | dense GFLOP/s | full / dense time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        v = groups[key]
        rate = {n: v[n]["gflop_per_token"] * key[2] / (v[n]["ms"] / 1e3) for n in ("full", "dense")}
        extra = (v["ce"]["ms"] - v["top-m"]["ms"]) / v["ce"]["ms"]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {extra:.0%} | {rate['full']:.0f} | {rate['dense']:.0f} | "
            f"{v['full']['ms'] / v['dense']['ms']:.2f} |"
        )
    return lines


def targets(result: dict) -> list[tuple[str, float, float, str, bool]]:
    """The CPU targets that this result can speak to, with the measured ratios: compressed experts
    against the fastest full top-k (:data:`TARGETS`), this library's full top-k against transformers'
    fastest in every row, and end-to-end decode against the faster full top-k model."""
    if result["device"] != "cpu":  # the targets are for this project's 2-core CPU
        return []
    out = []
    groups = _grouped_rows(result["rows"])
    for what, shape, dtype, tokens, mode, variant, bound in TARGETS:
        variants = groups.get((shape, dtype, tokens, mode))
        if variants:
            value = variants[variant]["ms"] / _fastest_full(variants)[1]
            out.append((f"{what} ({shape}, {dtype}, {tokens} tokens, {mode})", value, bound, "max", value <= bound))
    for (shape, dtype, tokens, mode), variants in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])
    ):
        value = variants["full"]["ms"] / _fastest_transformers(variants)["ms"]
        what = f"full top-k / transformers' fastest ({shape}, {dtype}, {tokens} tokens, {mode})"
        out.append((what, value, 1.0, "max", value <= 1.0))
    e2e = result.get("end_to_end")
    if e2e:
        fastest = max(e2e[k]["decode_tokens_per_s"] for k in ("transformers", "full") if k in e2e)
        value = e2e["ce"]["decode_tokens_per_s"] / fastest
        what = "decode tokens/s, compressed experts / fastest full top-k model (end to end)"
        out.append((what, value, DECODE_SPEEDUP, "min", value >= DECODE_SPEEDUP))
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
            f"results (every *.json goes into the report): move it, or choose another out_dir",
            settings=("out_dir",),
        )
    return result


def stored_results(directory: Path) -> dict[Path, dict]:
    """Every result in ``directory`` (each ``*.json``), each checked by :func:`read_result`."""
    return {p: read_result(p) for p in sorted(directory.glob("*.json"))} if directory.is_dir() else {}


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
    """The name of a device's results file: ``cpu``, or ``cuda-<card>``."""
    if dev.type == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


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
) -> dict:
    """Run the layer benchmark (and the end-to-end one) and return the result as a JSON-ready dict.

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
            **bench_end_to_end(dev, getattr(torch, E2E_DTYPE), repeats=repeats, progress=progress),
        }
        save()
    return result
