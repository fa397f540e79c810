"""``bench --engine vllm``: output tokens/s of full top-k, top-m and compressed experts served by vLLM.

The three variants of one model are saved side by side (full top-k as given; top-m and compressed
experts converted with ``n_ce``, the latter's vectors perturbed so that they are not the identity),
then each is loaded into vLLM in turn and timed on 1, 8 and 64 (by default) concurrent requests of
equal-length random prompts, greedy, a fixed number of new tokens each (end-of-sequence ignored), after
a warm-up; each count is timed ``repeats`` times and the median kept. Optionally the same batches go
through transformers' ``generate`` on the same saved directory, for the engine's own gain. Ratios
are taken within the run: each variant's tokens/s over full top-k's at the same request count.

With a per-token rule (``rule={"top_p": 0.7}`` or ``{"skip_below": 0.3}``) two more variants are
timed: top-m and compressed experts under that rule instead of ``n_ce`` (named as ``compare`` names
them: ``top_p=0.7`` and ``top_p=0.7 + CE``). Every row gives its main experts per token: ``k`` and
``k - n_ce`` for the fixed variants; for a rule, measured by the library's model on the sequences
vLLM served in that run (prompts and generated tokens of the largest request count).
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import from_pretrained, load_tokenizer, skeleton
from ..config import CEConfig
from ..errors import CompressedExpertsError
from ..layer import is_compressed_expert
from ..parameters import active_parameters
from .engine import check_engine, engine_device, vllm_on_cpu

#: The variants, and the form each is converted to (None: the model as given).
VARIANTS = {"full top-k": None, "top-m": "none", "compressed experts": "ia3"}
PROMPT_TOKENS = 16


def variants(rule: dict[str, float] | None = None) -> dict[str, tuple[str | None, bool]]:
    """Each variant's name -> (form, under ``rule``): the fixed three, and with a per-token rule its
    top-m (form none) and compressed experts (ia3)."""
    out = {name: (form, False) for name, form in VARIANTS.items()}
    if rule:
        ((setting, value),) = rule.items()
        out |= {f"{setting}={value}": ("none", True), f"{setting}={value} + CE": ("ia3", True)}
    return out


def save_variants(
    source: str, n_ce: int, root: Path, dtype: str, rule: dict[str, float] | None = None
) -> dict[str, Path]:
    """Full top-k, top-m and compressed experts of ``source`` (with ``rule``, also both under it),
    saved under ``root`` (with the tokenizer)."""
    out = {}
    for name, (form, ruled) in variants(rule).items():
        path = root / name.replace(" ", "-")
        if form is None:
            model = from_pretrained(source, dtype=dtype)
        else:
            model = from_pretrained(source, form=form, dtype=dtype, **(rule if ruled else {"n_ce": n_ce}))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if is_compressed_expert(pname):
                    param.mul_(torch.empty(param.shape).uniform_(0.7, 1.3, generator=generator).to(param.dtype))
        model.save_pretrained(path)
        load_tokenizer(source).save_pretrained(path)
        out[name] = path
    return out


def _prompts(count: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return torch.randint(4, min(vocab, 4000), (count, PROMPT_TOKENS), generator=generator).tolist()


def vllm_rates(
    path: Path,
    requests: Sequence[int],
    new_tokens: int,
    repeats: int,
    dtype: str,
    prompts: Callable[[int], list[list[int]]],
):
    """Output tokens/s of the model saved at ``path`` served by vLLM, by request count (``prompts(count)``
    gives that many prompts, greedy, ``new_tokens`` each, median of ``repeats``), and the sequences served
    at the largest count (prompt and generated ids)."""
    from vllm import LLM, SamplingParams

    cpu = vllm_on_cpu()  # every caller: vLLM's CPU build fails to start without a KV-cache size when memory is in use
    llm = LLM(
        str(path),
        dtype=dtype,
        enforce_eager=cpu,
        max_model_len=max(len(p) for p in prompts(max(requests))) + new_tokens,
        max_num_seqs=max(requests),
        skip_tokenizer_init=True,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": prompts(1)[0]}], params, use_tqdm=False)  # warm-up
        rates = {}
        for count in requests:
            batch = [{"prompt_token_ids": p} for p in prompts(count)]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                outputs = llm.generate(batch, params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            rates[count] = sum(len(o.outputs[0].token_ids) for o in outputs) / statistics.median(times)
            if count == max(requests):
                served = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs]
        return rates, served
    finally:
        del llm
        gc.collect()


def _transformers_rate(path: Path, count: int, new_tokens: int, repeats: int, dtype: str, vocab: int) -> float:
    model = from_pretrained(str(path), dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(_prompts(count, vocab))
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    times = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            times.append(time.perf_counter() - start)
    return count * new_tokens / statistics.median(times)


def _main_experts(path: Path, dtype: str, sequences: list[list[int]]) -> float:
    """Main experts per token per MoE block of the model saved at ``path`` (under a per-token rule) on ``sequences``."""
    model = from_pretrained(str(path), dtype=dtype).to(engine_device()).eval()
    with torch.no_grad():
        return active_parameters(model, input_ids=sequences)["main_experts_per_token"]


def engine_benchmark(
    source: str = "bundled",
    *,
    n_ce: int = 4,
    rule: dict[str, float] | None = None,
    requests: Sequence[int] = (1, 8, 64),
    new_tokens: int = 64,
    repeats: int = 3,
    dtype: str = "float32",
    transformers: bool = True,
    progress: Any = None,
) -> dict[str, Any]:
    """Tokens/s of each variant through vLLM (and transformers' generate with ``transformers``), one run;
    ``rule`` (``{"top_p": p}`` or ``{"skip_below": s}``) adds top-m and compressed experts under it."""
    check_engine("vllm", source, converted=True)
    if not requests or min(requests) < 1 or new_tokens < 1 or repeats < 1:
        raise CompressedExpertsError("requests, new_tokens and repeats must be 1 or more")
    if rule is not None:  # refused now, not after the first variants ran
        if len(rule) != 1 or next(iter(rule)) not in ("top_p", "skip_below"):
            raise CompressedExpertsError(
                f"rule is one per-token rule, {{'top_p': p}} or {{'skip_below': s}}, not {rule!r}"
            )
        CEConfig(**rule)  # a valid value
    say = progress or (lambda message: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_variants(source, n_ce, Path(tmp), dtype, rule)
        vocab = len(load_tokenizer(source))
        top_k = skeleton(source).config.num_experts_per_tok
        for name, path in paths.items():
            say(f"{name}: vLLM")
            rates, sequences = vllm_rates(path, requests, new_tokens, repeats, dtype, lambda n: _prompts(n, vocab))
            form, ruled = variants(rule)[name]
            if ruled:
                say(f"{name}: main experts per token")
                main = _main_experts(path, dtype, sequences)
            else:
                main = top_k if form is None else top_k - n_ce
            for count in requests:
                row = {
                    "variant": name,
                    "requests": count,
                    "main_experts_per_token": main,
                    "vllm_tokens_s": rates[count],
                }
                if transformers:
                    say(f"{name}: transformers, {count} requests")
                    row["transformers_tokens_s"] = _transformers_rate(path, count, new_tokens, repeats, dtype, vocab)
                rows.append(row)
    full = {row["requests"]: row["vllm_tokens_s"] for row in rows if row["variant"] == "full top-k"}
    for row in rows:
        row["vs_full_top_k"] = row["vllm_tokens_s"] / full[row["requests"]]
        if transformers:
            row["vllm_over_transformers"] = row["vllm_tokens_s"] / row["transformers_tokens_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    settings = {"source": source, "n_ce": n_ce, "new_tokens": new_tokens, "repeats": repeats, "dtype": dtype}
    if rule:
        settings["rule"] = dict(rule)
    return {"device": device, "settings": settings, "rows": rows}


def engine_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    with_hf = "transformers_tokens_s" in result["rows"][0]
    with_main = "main_experts_per_token" in result["rows"][0]  # not in runs from before the rule variants
    head = "| variant |" + (" main experts/token |" if with_main else "")
    head += " requests | vLLM tokens/s | vs full top-k |"
    head += " transformers tokens/s | vLLM / transformers |" if with_hf else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in result["rows"]:
        main = f" {row['main_experts_per_token']:.2f} |" if with_main else ""
        line = (
            f"| {row['variant']} |{main} {row['requests']} | {row['vllm_tokens_s']:.0f} | {row['vs_full_top_k']:.2f} |"
        )
        if with_hf:
            line += f" {row['transformers_tokens_s']:.0f} | {row['vllm_over_transformers']:.1f}x |"
        lines.append(line)
    return "\n".join(lines)
