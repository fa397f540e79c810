"""Fully sharded data parallel (PyTorch's FSDP2) for compressed-experts models, and sharded checkpoints.

The transformers Trainer shards a model through accelerate (``accelerate launch`` with an FSDP
config, README "Many GPUs"); accelerate does so on GPUs only, so these are the same steps as
plain functions, for a training loop of one's own and for the tests, which run them on CPU
processes (gloo):

- :func:`shard` wraps each decoder layer (the model's ``_no_split_modules``, what accelerate's
  auto-wrap policy takes) and then the whole model in ``fully_shard``. The compressed experts
  are sharded with their decoder layer, along the expert dimension like the expert weights
  they belong to: each process holds ``1/world`` of them, and they are all-gathered with the
  layer for its forward and backward. Keeping them whole would save nothing worth a second code
  path (they are ``E (2H + I)`` numbers a block) and would need their gradients averaged by hand.
- :func:`save_sharded` / :func:`load_sharded`: model and optimizer state as each process holds
  it (``torch.distributed.checkpoint``), written to a staging folder and renamed into place
  once every process has written, so a run killed while saving keeps its previous checkpoint.
- :func:`full_state_dict` gathers the whole model (every process takes part), for
  ``save_pretrained`` on the main process; :func:`compressed_experts.save_compressed_experts`
  gathers sharded compressed experts itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..checkpoint import commit_staged, staging_dir
from ..errors import CompressedExpertsError


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(model: nn.Module, *, reshard_after_forward: bool = True, **fsdp_kwargs: Any) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root; returns it.

    Call it in every process of an initialised process group, on identical weights, before
    the optimizer is built (the optimizer must see the sharded parameters).
    """
    if not dist.is_initialized():
        raise CompressedExpertsError(
            "shard needs a process group: start with torchrun and call init_process_group first"
        )
    if isinstance(model, FSDPModule):
        raise CompressedExpertsError(f"{type(model).__name__} is already sharded: shard it once")
    units = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise CompressedExpertsError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by"
        )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered to CPU (every process must call it; all receive it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Model and optimizer state as each process holds it, into ``directory`` (every process calls it).

    Written to a staging folder beside ``directory`` and renamed into place by the main process
    once all have written: a process killed mid-save leaves the previous ``directory`` whole.
    """
    directory = Path(directory)
    params = {id(p) for p in model.parameters()}
    if any(id(p) not in params for group in optimizer.param_groups for p in group["params"]):
        raise CompressedExpertsError(
            "the optimizer holds parameters the model no longer has: build it after shard(model)"
        )
    staging = staging_dir(directory)
    if _main():
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a save that was killed
        staging.mkdir(parents=True)
    _barrier()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(staging))
    _barrier()
    if _main():
        commit_staged(staging, directory)
    _barrier()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Restore what :func:`save_sharded` wrote into the (already sharded) ``model`` and its ``optimizer``."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CompressedExpertsError(
            f"{directory} is not a sharded checkpoint (no .metadata): was its save interrupted?"
        )
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
