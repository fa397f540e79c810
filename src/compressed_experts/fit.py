"""Training-free fitting: compressed experts learn, from calibration text, to reproduce the full top-k block.

Block by block in model order, the inputs each converted experts module receives on the
calibration text are captured (with the blocks before it already fitted, so that each block
also makes up for what the earlier ones still miss), the full top-k output on those inputs
is computed, and only the compressed experts are changed so that the converted block's output
matches it in mean squared error: ``subset`` and ``slim`` choose each expert's neurons by
their measured importance (reordering each expert's neurons, which leaves what the expert
computes unchanged, and resetting ``slim``'s MLPs to a copy of the chosen ones), and ``ia3``
and ``slim`` then fit their parameters with Adam. Routers, attention and everything else stay
as they are. Memory holds one block's inputs and targets at a time.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import CEConfig, collapsed, setting
from .errors import CompressedExpertsError
from .forms import REGISTRY, get_form
from .layer import CompressedExperts, is_compressed_expert, pruned_error
from .neurons import ActivationImportance, select_neurons
from .text import load_records, read_text_file, segments, token_blocks


def calibration_texts(source: str | os.PathLike | Sequence[str] | None, tokenizer=None) -> list[str]:
    """Calibration text from ``source``: a .txt file (split at blank lines), a .json/.jsonl/.parquet
    file or dataset name in any layout ``train`` reads (records flattened to their text), or a list
    of strings (used as they are; the command line passes the bundled corpus's held-out part so)."""
    if source is None:
        raise CompressedExpertsError(
            "no calibration text: pass a .txt, .json/.jsonl/.parquet file, a dataset name, or a list of strings"
        )
    if isinstance(source, (list, tuple)):
        if not all(isinstance(text, str) for text in source):
            raise CompressedExpertsError("calibration texts given as a list must all be strings")
        return list(source)  # a copy: the caller's list is not shuffled
    if not isinstance(source, (str, os.PathLike)):
        raise CompressedExpertsError(
            f"calibration source must be a file, a dataset name or a list of strings, not {type(source).__name__}"
        )
    source = os.fspath(source)
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise CompressedExpertsError(f"no such calibration file: {source}")
        # Paragraphs, so that a seed's shuffle draws different text from one file too.
        # Strictly UTF-8: a binary file is refused, not fitted on U+FFFD characters.
        return [part for part in read_text_file(path, source).split("\n\n") if part.strip()]
    return ["".join(text for text, _ in segments(record, tokenizer, "alpaca")) for record in load_records(source)]


def calibration_blocks(
    tokenizer,
    source: str | os.PathLike | Sequence[str] | None = None,
    seq_len: int = 256,
    tokens: int = 16384,
    seed: int = 0,
) -> torch.Tensor:
    """About ``tokens`` calibration tokens from ``source`` (see :func:`calibration_texts`; there is
    no default: pass the text) as ``[n, seq_len]`` blocks; the texts are shuffled by ``seed``
    first, so seeds draw different text."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise CompressedExpertsError(
            f"seq_len must be a whole number of tokens, 2 or more; got {seq_len!r}", settings=("seq_len",)
        )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < seq_len:
        raise CompressedExpertsError(
            f"tokens must be at least one block of seq_len ({seq_len}); got {tokens!r}", settings=("tokens", "seq_len")
        )
    texts = calibration_texts(source, tokenizer)
    if not any(text.strip() for text in texts):
        where = source if isinstance(source, (str, os.PathLike)) else "given as a list"
        raise CompressedExpertsError(f"the calibration data {where} holds no text")
    random.Random(seed).shuffle(texts)
    return token_blocks(tokenizer, texts, seq_len, tokens // seq_len)


class _Captured(Exception):
    """Stops the forward pass once the block being fitted has received its inputs."""


def _capture(model, layer: CompressedExperts, blocks: torch.Tensor, batch_size: int):
    """The (hidden_states, top_k_index, top_k_weights) that ``layer`` receives on every calibration block."""
    parts: list[tuple[torch.Tensor, ...]] = []

    def hook(module, args, kwargs):
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        parts.append(tuple(v.detach() for v in values[:3]))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], batch_size):
                try:
                    model(blocks[start : start + batch_size].to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _relative_error(layer: CompressedExperts, inputs, target: torch.Tensor, rows: int) -> float:
    """Mean squared error of the block against the full top-k output, over the target's mean square."""
    error = 0.0
    with torch.no_grad():
        for part in _chunks(target.shape[0], rows):
            out = layer(*(x[part] for x in inputs))
            error += (out.float() - target[part].float()).square().sum().item()
    return error / max(target.float().square().sum().item(), 1e-30)


def fittable_forms() -> tuple[str, ...]:
    """The forms :func:`fit` can change: those with parameters or a choice of neurons."""
    return tuple(name for name, form in REGISTRY.items() if form.parameters or form.selects_neurons)


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit` fits each block's compressed experts; refused when built if it cannot work."""

    steps: int = setting(200, "Adam steps per MoE block (forms with parameters: ia3, slim).")
    lr: float | None = setting(None, "Adam learning rate; default the form's (ia3 1e-2, slim 1e-3).")
    batch_tokens: int = setting(4096, "Calibration tokens per Adam step (drawn at random from all of them).")
    batch_size: int = setting(8, "Calibration sequences run through the model at a time.")
    seed: int = setting(0, "Seed of the fitting batches (and, in the fit command, of the calibration text's order).")

    def __post_init__(self) -> None:
        for name, least in (("steps", 0), ("batch_tokens", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CompressedExpertsError(
                    f"{name} must be a whole number, at least {least}; got {value!r}", settings=(name,)
                )
        lr = self.lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise CompressedExpertsError(f"lr must be a positive number, got {lr!r}", settings=("lr",))


def fit(
    model, blocks: torch.Tensor, config: FitConfig | None = None, *, progress: bool = True, **settings: Any
) -> dict[str, Any]:
    """Fit the compressed experts of a converted ``model`` to its full top-k blocks, in place.

    The settings are a :class:`FitConfig`, or its fields as keyword arguments
    (``fit(model, blocks, steps=100)``).

    ``blocks`` is ``[n, seq_len]`` calibration token ids (see
    :func:`compressed_experts.text.token_blocks`); the model runs them ``batch_size``
    sequences at a time. Each block's parameters take ``steps`` Adam steps of ``batch_tokens``
    tokens drawn (seeded) from the calibration tokens, at ``lr`` (default: the form's ``fit_lr``,
    found on the bundled model, see RESULTS.md). Returns, per block, the relative error as
    converted, after choosing neurons (``before``) and after fitting, and the time. Fit in float32: Adam steps on
    bfloat16 vectors near 1.0 are mostly rounded away (a warning says so).
    """
    layers = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if not layers:
        raise CompressedExpertsError(
            "this model has no compressed experts: convert it first (n_ce and form), then fit",
            settings=("n_ce", "form"),
        )
    removed = [layer for layer in layers if layer.removed]
    if removed:  # before any text runs: their full top-k targets are gone
        raise pruned_error(removed[0].ce_config)
    if not any(layer.compresses for layer in layers):  # a RuntimeError at the first Adam step otherwise
        raise CompressedExpertsError(
            "n_ce 0 replaces no experts, so there is nothing to fit: convert with n_ce of 1 or more",
            settings=("n_ce",),
        )
    # Blocks of a plan may differ: each is fitted as its own form says; those with nothing to fit are left.
    fitted = [layer.compresses and layer.form in fittable_forms() for layer in layers]
    if not any(fitted):
        forms = ", ".join(sorted({layer.form for layer in layers}))
        raise CompressedExpertsError(
            f"form {forms} has nothing to fit; choose one of {', '.join(fittable_forms())}", settings=("form",)
        )
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.numel() == 0:
        raise CompressedExpertsError("calibration blocks must be a non-empty [n, seq_len] tensor of token ids")
    if config is not None and settings:
        raise CompressedExpertsError("give fit a FitConfig or its settings as keywords, not both")
    if config is not None and not isinstance(config, FitConfig):
        raise CompressedExpertsError(
            f"config must be a FitConfig, got {type(config).__name__}; give steps= etc. as keywords"
        )
    try:
        config = config or FitConfig(**settings)
    except TypeError as err:  # an unknown keyword
        raise CompressedExpertsError(f"fit: {err}; its settings are those of FitConfig") from None
    steps, batch_tokens, batch_size, seed = config.steps, config.batch_tokens, config.batch_size, config.seed
    settings = collapsed(tuple(layer.ce_config for layer in layers))
    one = settings if isinstance(settings, CEConfig) else None
    lr = get_form(one.form).fit_lr if config.lr is None and one else config.lr  # None: no Adam (subset), or per form
    low = sorted(
        {str(p.dtype) for n, p in model.named_parameters() if is_compressed_expert(n) and p.dtype != torch.float32}
    )
    if low:
        warnings.warn(
            f"fitting compressed experts held in {', '.join(low)}: small Adam steps are rounded away; "
            f"load the model in float32 to fit it",
            stacklevel=2,
        )
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    report: dict[str, Any] = {
        "form": one.form if one else "per block",
        "n_ce": one.n_ce if one else None,
        "rule": one.rule if one else "per block (a plan)",
        "r": one.r if one else None,
        **({} if one else {"plan": [c.to_dict() for c in settings]}),
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "calibration_tokens": blocks.numel(),
        "blocks": [],
    }
    started = time.perf_counter()
    bar = tqdm(total=len(layers) * (steps + 1), desc="fitting", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for number, layer in enumerate(layers):
            if not fitted[number]:
                bar.update(steps + 1)
                continue
            spec = layer.form_spec
            bar.set_postfix_str(f"block {number + 1}/{len(layers)}: capturing")
            began = time.perf_counter()
            inputs = _capture(model, layer, blocks, batch_size)
            bar.set_postfix_str(f"block {number + 1}/{len(layers)}: fitting")
            rows = inputs[0].shape[0]
            with torch.no_grad():
                target = torch.cat([layer.full(*(x[part] for x in inputs)) for part in _chunks(rows, batch_tokens)])
            converted = _relative_error(layer, inputs, target, batch_tokens)
            if spec.selects_neurons:
                importance = ActivationImportance(layer)
                for part in _chunks(rows, batch_tokens):
                    importance.update(*(x[part] for x in inputs))
                select_neurons(layer, importance.result())
            before = _relative_error(layer, inputs, target, batch_tokens)
            bar.update(1)
            params = [p for n, p in layer.named_parameters() if is_compressed_expert(n)]
            if params and steps:
                for p in params:
                    p.requires_grad_(True)
                optimizer = torch.optim.Adam(params, lr=spec.fit_lr if config.lr is None else config.lr)
                for _ in range(steps):
                    pick = torch.randint(rows, (min(batch_tokens, rows),), generator=generator).to(target.device)
                    loss = (layer(*(x[pick] for x in inputs)).float() - target[pick].float()).square().mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
                for p in params:
                    p.requires_grad_(False)
            else:
                bar.update(steps)
            after = _relative_error(layer, inputs, target, batch_tokens)
            report["blocks"].append(
                {
                    "block": number,
                    "tokens": rows,
                    "relative_error_converted": converted,
                    "relative_error_before": before,
                    "relative_error_after": after,
                    "seconds": time.perf_counter() - began,
                }
            )
            del inputs, target
    finally:
        bar.close()
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        model.train(was_training)
    report["seconds"] = time.perf_counter() - started
    return report
