"""``bench --engine transformers``: whole models, as saved, timed and weighed side by side.

The layer benchmark times blocks of a model's shape; it cannot say what a user's own result costs.
Pruning saves memory, stand-ins and compressed experts save compute, and a user wants both measured
on the model they made against the one they started from. So every model given is loaded as
saved, through this library's loader (compressed-experts checkpoints, pruned models, plans and
stand-ins all load; a plain checkpoint loads as its family), and all are held at once so that
they can be timed in turns (:func:`~compressed_experts.bench.interleaved_medians`): a slow spell of
a shared machine falls on every model alike, and each ratio is of figures measured in one run.

The first model is the reference: it loads in the dtype it was saved in and the others in its dtype
(a float32 model is not timed against a bfloat16 original), and every ratio is to it. Per model: total parameters and the bytes its weights take in memory (tied tensors counted once),
the checkpoint's bytes on disk (a local folder), active parameters and expert-equivalents per
token (measured on the prompts where they depend on the text), prefill tokens/s of ``prompt``
tokens, and greedy decode tokens/s at each batch size; each also as a ratio to the first model.
The prompts are real text (so that the routing, and with it what stand-ins and per-token rules
run, is that of text), cut into equal-length pieces so that a batch needs no padding.

``bench --engine vllm --model A,B,...`` (:func:`served_models_benchmark`) compares the same way where
the models are served: each through vLLM (the plugin serves compressed-experts checkpoints, pruned
ones with stand-ins too), in the first model's dtype, on the same real-text prompts, output tokens/s
at each number of concurrent requests. vLLM holds one model at a time, so the models are timed one
after another (each count's median of ``repeats``), not in turns; their weights are counted from
their structure (parameters times the dtype's bytes), without loading them twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .bench import decode_rates, device_key, interleaved_medians, machine, resolve_device
from .checkpoint import from_pretrained, load_tokenizer, skeleton
from .errors import CompressedExpertsError
from .parameters import describe
from .sources import local_path
from .text import token_blocks

#: Prompt length (tokens) and tokens generated per sequence, by default.
PROMPT, NEW_TOKENS = 256, 32


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory, each storage counted once (tied
    embeddings are one tensor)."""
    seen: dict[tuple[int, torch.device], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(seen.values())


def checkpoint_bytes(source: str) -> int | None:
    """Bytes of a local checkpoint's weight files (``*.safetensors``, ``*.bin``; ``bundled`` is the
    package's folder); None for a hub id or a tiny model."""
    path = local_path(source)
    if path is None or not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def check_sources(sources: Sequence[str]) -> None:
    """Refuse, before any model loads, a list that cannot make a comparison."""
    if len(sources) < 2:
        raise CompressedExpertsError(
            "give at least two models to compare, comma-separated, the reference first "
            "(e.g. --model bundled,out/pruned)",
            settings=("model",),
        )
    if len(set(sources)) < len(sources):
        raise CompressedExpertsError(f"a model is named twice in {', '.join(sources)}", settings=("model",))


def prompts(tokenizer, texts: Sequence[str], batch: int, length: int) -> torch.Tensor:
    """``[batch, length]`` token ids cut from ``texts`` (no padding), or a clear error if they are too short."""
    if length < 1:
        raise CompressedExpertsError(f"prompts need at least 1 token each, not {length}", settings=("prompt_tokens",))
    ids = token_blocks(tokenizer, texts, length, batch)  # stops reading once the batch is full
    if ids.shape[0] < batch:
        raise CompressedExpertsError(
            f"the prompt text holds {ids.shape[0]} pieces of {length} tokens, and the largest batch needs "
            f"{batch}: give more text, a shorter prompt or smaller batches",
            settings=("text", "requests"),
        )
    return ids[:batch]


def models_benchmark(
    sources: Sequence[str],
    texts: Sequence[str],
    device: str = "auto",
    batches: Sequence[int] = (1, 8),
    prompt: int = PROMPT,
    new_tokens: int = NEW_TOKENS,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Load every model of ``sources`` on ``device`` (the first in the dtype it was saved in, the others in
    the first's, so that a float32 fit is not timed against a bfloat16 original) and measure them side by side on
    prompts cut from ``texts`` (tokenized by the first model's tokenizer: the models must share it).
    Returns a JSON-ready dict: ``models`` (one entry per source, in order) and the run's settings."""
    check_sources(sources)
    if new_tokens < 2:
        raise CompressedExpertsError("new_tokens must be at least 2: decode is timed beyond the first token")
    dev = resolve_device(device)
    tokenizer = load_tokenizer(sources[0])
    ids = prompts(tokenizer, texts, max(batches), prompt).to(dev)  # before any weights load
    models = {}
    for source in sources:  # the reference as saved, the others in its dtype: like is timed against like
        progress(f"loading {source}")
        dtype = "auto" if not models else next(iter(models.values())).dtype
        models[source] = from_pretrained(source, dtype=dtype).to(dev).eval()
        if models[source].config.vocab_size < len(tokenizer):  # added tokens too
            raise CompressedExpertsError(
                f"{source} has a vocabulary of {models[source].config.vocab_size} tokens, smaller than the "
                f"tokenizer of {sources[0]}: compare models that share a tokenizer",
                settings=("model",),
            )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    entries = {}
    with torch.no_grad():
        for source, model in models.items():
            figures = describe(model, ids.cpu())  # per-token counts, measured on these prompts where they vary
            entries[source] = {
                "source": source,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "parameters": figures["total"],
                "weight_bytes": weight_bytes(model),
                "checkpoint_bytes": checkpoint_bytes(source),
                "active_parameters": figures.get("active"),
                "expert_equivalents": figures.get("expert_equivalents"),
                "prefill_tokens_per_s": {},
                "decode_tokens_per_s": {},
            }
        generates = {source: model.generate for source, model in models.items()}
        for batch in batches:
            piece = ids[:batch]
            progress(f"prefill, batch {batch}")
            prefill = interleaved_medians(  # the last position's logits only, as generate's prefill
                {s: (lambda m=m, piece=piece: m(piece, logits_to_keep=1)) for s, m in models.items()}, dev, repeats
            )
            progress(f"decode, batch {batch}")
            rates = decode_rates(generates, piece, new_tokens, dev, repeats, pad)
            for source in models:
                entries[source]["prefill_tokens_per_s"][str(batch)] = batch * prompt / prefill[source]
                entries[source]["decode_tokens_per_s"][str(batch)] = rates[source]
    return {
        "device": device_key(dev),
        "machine": machine(dev),
        "prompt": prompt,
        "new_tokens": new_tokens,
        "batches": list(batches),
        "repeats": repeats,
        "models": list(entries.values()),
    }


def served_models_benchmark(
    sources: Sequence[str],
    texts: Sequence[str],
    requests: Sequence[int] = (1, 8, 64),
    prompt: int = PROMPT,
    new_tokens: int = NEW_TOKENS,
    repeats: int = 3,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Serve every model of ``sources`` through vLLM in turn and time it on the same prompts cut from
    ``texts`` (the first model's tokenizer): output tokens/s at each count of concurrent ``requests``,
    with parameters, weight bytes in the served dtype (the first model's) and checkpoint bytes. Returns
    the same JSON-ready dict as :func:`models_benchmark`, with ``engine: vllm`` and ``requests``."""
    from .serving.bench import vllm_rates
    from .serving.engine import check_engine

    check_sources(sources)
    if not requests or min(requests) < 1 or new_tokens < 1 or repeats < 1:
        raise CompressedExpertsError("requests, new_tokens and repeats must be 1 or more")
    for source in sources:  # what vLLM would refuse, refused before any model is served
        check_engine("vllm", source)
    shapes = {source: skeleton(source) for source in sources}
    saved = shapes[sources[0]].config.dtype
    dtype = str(saved).removeprefix("torch.") if saved is not None else "float32"
    ids = prompts(load_tokenizer(sources[0]), texts, max(requests), prompt).tolist()
    entries = []
    for source, shape in shapes.items():
        progress(f"serving {source}")
        rates, _ = vllm_rates(local_path(source) or source, requests, new_tokens, repeats, dtype, lambda n: ids[:n])
        parameters = sum(p.numel() for p in shape.parameters())
        entries.append(
            {
                "source": source,
                "dtype": dtype,
                "parameters": parameters,
                "weight_bytes": parameters * getattr(torch, dtype).itemsize,
                "checkpoint_bytes": checkpoint_bytes(source),
                "active_parameters": None,  # per token on text: --engine transformers measures them
                "expert_equivalents": None,
                "output_tokens_per_s": {str(n): rates[n] for n in requests},
            }
        )
    return {
        "engine": "vllm",
        "device": device_key(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "machine": machine(torch.device("cuda") if torch.cuda.is_available() else None),
        "prompt": prompt,
        "new_tokens": new_tokens,
        "requests": list(requests),
        "repeats": repeats,
        "models": entries,
    }


def _ratio(value: float | None, reference: float | None) -> str:
    return "" if value is None or not reference else f" ({value / reference:.2f}x)"


def models_table(result: dict) -> str:
    """The result as markdown: a row per figure, a column per model (few models, many figures: it fits a
    terminal), each figure after the first model's with its ratio to the first model's."""
    models = result["models"]
    first = models[0]

    def row(name: str, value: Callable[[dict], float | None], text: Callable[[float], str]) -> str | None:
        if all(value(m) is None for m in models):  # not measured by this engine
            return None
        cells = [text(value(first))] if value(first) is not None else ["-"]
        for m in models[1:]:
            v = value(m)
            cells.append("-" if v is None else text(v) + _ratio(v, value(first)))
        return f"| {name} | " + " | ".join(cells) + " |"

    whole = lambda v: f"{v:,.0f}"  # noqa: E731
    mb = lambda v: f"{v / 2**20:,.1f} MB"  # noqa: E731
    served = result.get("engine") == "vllm"
    how = (
        f"served by vLLM one after another, medians of {result['repeats']} runs"
        if served
        else (f"medians of {result['repeats']} turns")
    )
    lines = [
        f"Machine: {result['machine']}. Prompts of {result['prompt']} tokens, {result['new_tokens']} greedy "
        f"tokens each; {how}. In brackets: over the first model.",
        "",
        "| | " + " | ".join(f"`{m['source']}` ({m['dtype']})" for m in models) + " |",
        "|---|" + "---|" * len(models),
        row("parameters", lambda m: m["parameters"], whole),
        row("weights in memory", lambda m: m["weight_bytes"], mb),
        row("checkpoint on disk", lambda m: m["checkpoint_bytes"], mb),
        row("active parameters / token", lambda m: m["active_parameters"], whole),
        row("expert-equivalents / token", lambda m: m["expert_equivalents"], lambda v: f"{v:.2f}"),
    ]
    if served:
        for n in map(str, result["requests"]):
            lines.append(row(f"vLLM output tokens/s, {n} requests", lambda m, n=n: m["output_tokens_per_s"][n], whole))
    else:
        for batch in map(str, result["batches"]):
            lines.append(
                row(f"prefill tokens/s, batch {batch}", lambda m, b=batch: m["prefill_tokens_per_s"][b], whole)
            )
        for batch in map(str, result["batches"]):
            lines.append(row(f"decode tokens/s, batch {batch}", lambda m, b=batch: m["decode_tokens_per_s"][b], whole))
    return "\n".join(line for line in lines if line is not None) + "\n"
