"""A training loop under FSDP2 on CPU processes, for tests/test_fsdp.py (run with torchrun; not a test itself).

Trains ``tiny:olmoe`` converted with n_ce=2 on fixed token batches: each step's global batch is
split across the processes. Writes ``losses.json`` (per step, as the main process saw the
global mean), sharded checkpoints, the gathered final model, its vectors file and the logits
of a probe batch, as the options ask.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

import compressed_experts as ce
from compressed_experts.training.sharding import full_state_dict, load_sharded, save_sharded, shard

GLOBAL_BATCH, SEQ = 4, 32


def batch(step: int) -> torch.Tensor:
    return torch.randint(3, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def fresh_model():
    torch.manual_seed(0)
    model = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
    with torch.no_grad():  # vectors away from 1.0, so that their sharding and gathering show
        for name, p in model.named_parameters():
            if ce.layer.is_compressed_expert(name):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(7))
    return model.train()


def misuse(out: Path) -> None:
    """An optimizer built before sharding, and a model sharded twice: the errors they get."""
    errors = {}
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters())
    shard(model)
    for name, mistake in (
        ("stale optimizer", lambda: save_sharded(model, optimizer, out / "ckpt")),
        ("sharded twice", lambda: shard(model)),
    ):
        try:
            mistake()
        except ce.CompressedExpertsError as err:
            errors[name] = str(err)
    (out / "errors.json").write_text(json.dumps(errors))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-shard", action="store_true")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--die-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--misuse", action="store_true", help="record the errors of two mistakes, then stop")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    if args.misuse:
        misuse(Path(args.out))
        dist.destroy_process_group()
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    model = fresh_model()
    if not args.no_shard:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses, start = {}, 0
    if args.resume:
        last = max(out.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
        load_sharded(model, optimizer, last)
        start = int(last.name.split("-")[1])
        losses = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items() if int(k) <= start}
    per = GLOBAL_BATCH // world
    for step in range(start + 1, args.steps + 1):
        ids = batch(step)[rank * per : (rank + 1) * per]
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses[step] = mean.item() / world
        if rank == 0:
            (out / "losses.json").write_text(json.dumps(losses))
        if args.save_every and step % args.save_every == 0:
            save_sharded(model, optimizer, out / f"ckpt-{step}")
        if step == args.die_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: no clean-up of any kind
    layer = next(m for m in model.modules() if isinstance(m, ce.CompressedExperts))
    sharded = type(layer.ce_gate).__name__ == "DTensor"
    local = tuple(layer.ce_gate.to_local().shape) if sharded else tuple(layer.ce_gate.shape)
    with torch.no_grad():
        probe = model.eval()(batch(0)[:2]).logits
    state = full_state_dict(model) if not args.no_shard else model.state_dict()
    ce.save_compressed_experts(model, out / "vectors.safetensors")  # every process: gathers, the first writes
    if rank == 0:
        plain = ce.convert(ce.tiny_model("olmoe"), ce.CEConfig(2))
        plain.load_state_dict(state)
        plain.save_pretrained(out / "final")
        torch.save(probe, out / "probe_logits.pt")
        (out / "info.json").write_text(json.dumps({"sharded": sharded, "ce_gate_local": local, "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
