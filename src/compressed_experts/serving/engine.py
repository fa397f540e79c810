"""Generation through vLLM's engine, for ``eval --engine vllm``: the model as it will be served.

The prompts are tokenized here with the evaluation's own tokenizer and handed to vLLM as token
ids, so both engines see the same tokens (BOS or not, as the prompt style asks); vLLM decodes
greedily (or samples at ``temperature``) with the model's end-of-sequence tokens and the caller cuts the text at the task's stop strings. vLLM loads the saved directory itself, with this package's plugin for
compressed-experts checkpoints.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

from ..errors import CompressedExpertsError
from ..sources import local_path, resolve, tiny_family
from .server import CPU_KV_CACHE_GIB, vllm_available
from .vllm_plugin import check_servable

ENGINES = ("transformers", "vllm")


def check_engine_name(engine: str) -> None:
    """Refuse an engine that does not exist."""
    if engine not in ENGINES:
        raise CompressedExpertsError(
            f"engine must be one of {', '.join(ENGINES)}, not {engine!r}", settings=("engine",)
        )


def check_engine(engine: str, source: str | None, *, converted: bool = False) -> None:
    """Refuse an unknown engine, and vLLM where it is missing or cannot load ``source`` (``converted``:
    ``source`` converted to compressed experts, as ``bench`` serves it), before any work."""
    check_engine_name(engine)
    if engine != "vllm":
        return
    if not vllm_available():
        raise CompressedExpertsError(
            "engine vllm needs vLLM beside this package: see docs/serving.md (pip install -e '.[serve]', "
            "or scripts/serve_env.sh on CPU)",
            settings=("engine",),
        )
    if source is None or tiny_family(source) is not None:
        raise CompressedExpertsError(
            "engine vllm loads the model from a saved directory or hub id: save it first "
            "(compressed-experts convert ... --out DIR) and evaluate DIR",
            settings=("engine",),
        )
    check_servable(source, converted=converted)


def engine_device() -> str:
    """Where vLLM runs its model (for the results' settings): cuda where there is a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def generate_with_vllm(
    source: str,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    dtype: str = "auto",
    progress: bool = True,
    add_special_tokens: bool = True,
) -> list[str]:
    """Each prompt's continuation from vLLM (decoded by ``tokenizer``), up to ``max_new_tokens`` or an
    end-of-sequence token; the caller cuts at its stop strings, as it does for transformers' output."""
    from vllm import LLM, SamplingParams

    check_engine("vllm", source)
    model = resolve(source)
    path = local_path(model)
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    longest = max((len(ids) for ids in encoded), default=1) + max_new_tokens
    cpu = vllm_on_cpu()
    llm = LLM(
        str(path) if path is not None else model,
        dtype=dtype,
        enforce_eager=cpu,
        max_model_len=longest,
        skip_tokenizer_init=True,  # the ids come from the evaluation's tokenizer
    )
    try:
        eos = getattr(tokenizer, "eos_token_id", None)
        params = SamplingParams(
            temperature=temperature,
            max_tokens=max_new_tokens,
            stop_token_ids=[eos] if eos is not None else None,
            detokenize=False,
        )
        results = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=progress)
        texts = tokenizer.batch_decode([list(r.outputs[0].token_ids) for r in results], skip_special_tokens=True)
    finally:
        del llm
        gc.collect()
    return texts


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on the CPU here; if so, give it the KV-cache size its CPU build fails to
    start without when other processes hold memory (unless the user set one)."""
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    return cpu


def lm_eval_model(source: str, dtype: str = "auto", batch_size: int = 8) -> Any:
    """lm-evaluation-harness's own ``vllm`` model on the saved ``source``, as ``lm_eval --model vllm
    --model_args pretrained=DIR`` builds it: vLLM serves the checkpoint through this package's plugin,
    and lm-eval's prompts, batching and metrics apply unchanged.

    On vLLM's CPU build lm-eval 0.4's vllm model cannot import: it asks ``importlib.metadata`` for the
    distribution ``vllm``, and that build's distribution is ``vllm-cpu``. While its module is first
    imported, the question gets vLLM's own answer (``<version>+cpu``); the module keeps that answer,
    nothing else in the process sees it.
    """
    import importlib.metadata as metadata

    check_engine("vllm", source)
    real = metadata.version
    try:
        real("vllm")
    except metadata.PackageNotFoundError:
        metadata.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)
    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as err:
        raise CompressedExpertsError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval") from err
    finally:
        metadata.version = real
    model = resolve(source)
    path = local_path(model)
    return VLLM(
        pretrained=str(path) if path is not None else model,
        dtype=dtype,
        batch_size=batch_size,
        enforce_eager=vllm_on_cpu(),
    )
