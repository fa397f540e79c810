"""The transformers Trainer, with what fine-tuning MoE checkpoints here needs on top.

- The compressed experts get their own learning rate (a parameter group), because vectors
  that start at 1.0 barely move at the paper's 2e-5.
- Checkpoints are written to a staging folder and moved into place (the library's one staged
  save, :mod:`compressed_experts.checkpoint`), so a run killed while saving never leaves a half
  checkpoint that ``--resume`` would pick up.
- Resuming reloads weights through :func:`compressed_experts.from_pretrained`: transformers
  saves MoE experts in the hub's per-expert layout, which the Trainer's plain
  ``load_state_dict`` would silently skip.
- A loss that is not finite stops the run before the optimizer step, and weights that are not
  finite are never checkpointed, so the last checkpoint stays the last good one.
- Each checkpoint ends with ``run_state.json``: the run's loss sum and seconds so far (so that a
  resumed run's summary is the whole run's) and the size of every file in it, so that a
  damaged checkpoint is found before resuming (:func:`latest_good_checkpoint`).
- A progress bar with loss and tokens/s, and a JSON-lines log of every logged step.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint import commit_staged, from_pretrained, staging_dir, write_atomic
from ..errors import CompressedExpertsError
from ..layer import CompressedExperts, is_compressed_expert

KEEP_CHECKPOINTS = 2  # the newest ones; older ones are deleted as new ones land
RUN_STATE = "run_state.json"  # written last into each checkpoint
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside on resumption (no longer a checkpoint-* folder)


class TrainingDiverged(CompressedExpertsError):
    """The loss became NaN or infinite."""


class CETrainer(Trainer):
    """Trainer with a compressed-experts learning rate, atomic checkpoints and a NaN stop."""

    def __init__(self, *args, ce_lr: float | None = None, distill_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ce_lr = ce_lr
        self._staging: str | None = None
        self.distill_weight = distill_weight
        self._distilled = (
            [m for m in self.model.modules() if isinstance(m, CompressedExperts)] if distill_weight else []
        )
        self._distill_sum, self._distill_count = 0.0, 0
        #: The loss sum and seconds of the steps before the checkpoint this run resumed from.
        self.before: dict[str, float] = {"loss_sum": 0.0, "seconds": 0.0}
        self._started = time.perf_counter()

    def create_optimizer(self, model=None):
        """AdamW (fused where the build has it) with the compressed experts in a group of their own."""
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = set(self.get_decay_parameter_names(self.model))
            groups = [
                {
                    "params": [p for n, p in named if not is_compressed_expert(n) and n in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {
                    "params": [p for n, p in named if not is_compressed_expert(n) and n not in decay],
                    "weight_decay": 0.0,
                },
                {
                    "params": [p for n, p in named if is_compressed_expert(n)],
                    "weight_decay": 0.0,
                    "lr": self.ce_lr or self.args.learning_rate,
                },
            ]
            groups = [g for g in groups if g["params"]]
            fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, fused=fused)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for layer in self._distilled:
            layer.distill_loss = None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        terms = [layer.distill_loss for layer in self._distilled if layer.distill_loss is not None]
        if terms:  # the mean over blocks, so the weight does not grow with the model's depth
            distill = torch.stack(terms).mean()
            self._distill_sum = self._distill_sum + distill.detach()  # a tensor: read (one sync) only when logged
            self._distill_count += 1
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                # The LM loss is already a share of the accumulated batch's (it is divided by all its
                # tokens), so the Trainer will not divide; the per-micro-batch mean must be, or the
                # weight would grow with --grad-accum.
                distill = distill / self.current_gradient_accumulation_steps
            loss = loss + self.distill_weight * distill.to(loss.device)
            result = (loss, *result[1:]) if return_outputs else loss
        # One process alone must not stop: the others would wait for it forever. Under DDP the
        # averaged gradients carry the NaN to every process, and StopOnNonFinite stops them all.
        if self.args.world_size == 1 and not torch.isfinite(loss.detach()).all():
            raise diverged(f"the loss became {loss.item()}", self.state.global_step, self.args.output_dir)
        return result

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The Trainer's own test (training_step) of whether it will divide the loss by the accumulation steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return (
            bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def train(self, *args, **kwargs):
        self._started = time.perf_counter()
        for layer in self._distilled:
            layer.distill = True
        try:
            return super().train(*args, **kwargs)
        finally:  # the trained model goes on without the extra full top-k pass
            for layer in self._distilled:
                layer.distill, layer.distill_loss = False, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log entry, plus the mean distillation term since the last entry (when on)."""
        if self._distill_count and "loss" in logs:
            logs = {**logs, "distill": float(self._distill_sum) / self._distill_count}
            self._distill_sum, self._distill_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _get_output_dir(self, trial):
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def check_finite_weights(self, what: str) -> None:
        """Raise :class:`TrainingDiverged` unless every weight is finite, on every process (under
        FSDP each holds a shard), so that no checkpoint or final model is written from NaN weights.
        One device-side reduction and one sync: cheap beside the write it guards."""
        bad = non_finite_parameters(self.accelerator.unwrap_model(self.model))
        count = torch.tensor(float(len(bad)), device=self.args.device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        if count.item():
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise diverged(
                f"the weights became NaN or infinite ({shown or 'on another process'})",
                self.state.global_step - 1,  # the step whose update made them so
                self.args.output_dir,
                f"stopped without writing {what}",
            )

    def _save_checkpoint(self, model, trial) -> None:
        self.check_finite_weights(f"checkpoint-{self.state.global_step}")
        final_root = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = final_root / name
        # The Trainer writes <its output dir>/<name>: its output dir is the staging folder, meanwhile.
        staging = staging_dir(final)
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        totals = self.run_totals()  # every process: the unlogged loss is a device tensor
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            write_run_state(staging / name, self.state.global_step, totals)
            commit_staged(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            for old in sorted(_checkpoints(final_root), key=_step)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def run_totals(self) -> dict[str, float]:
        """The loss summed over every step so far (the Trainer's own sum for this call, logged and
        not yet logged, on top of :attr:`before`) and the seconds spent training them."""
        logged = getattr(self, "_total_loss_scalar", 0.0)
        pending = getattr(self, "_tr_loss", None)
        return {
            "loss_sum": self.before["loss_sum"] + logged + (float(pending) if pending is not None else 0.0),
            "seconds": self.before["seconds"] + time.perf_counter() - self._started,
        }

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            # FSDP checkpoints are the modules' own sharded state (torch.distributed.checkpoint), names
            # as in memory: the Trainer's FSDP loader restores them, compressed experts included.
            # (Not run here: accelerate shards on GPUs only; see training/sharding.py for the CPU tests.)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        # Read in float32 and cast per tensor: with bfloat16 weights the compressed experts are
        # float32 master copies, which a bfloat16 load would round back to 1.0.
        saved = from_pretrained(resume_from_checkpoint, dtype=torch.float32).state_dict()
        live = model.state_dict()
        model.load_state_dict({k: v.to(live[k].dtype) for k, v in saved.items()})


def diverged(
    what: str, step: int, output_dir: str, stopped: str = "stopped before updating the weights"
) -> TrainingDiverged:
    last = latest_checkpoint(Path(output_dir))
    return TrainingDiverged(
        f"{what} at step {step + 1}; {stopped}. Last good checkpoint: {last or 'none yet'}. "
        f"Try a lower lr or precision fp32",
        settings=("lr", "precision"),
    )


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or infinity (of this process's shard, for sharded ones)."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()]
    named = [(n, p) for n, p in named if p.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all().to(named[0][1].device) for _, p in named]).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


class StopOnNonFinite(TrainerCallback):
    """Stop before an optimizer step whose gradients hold NaN or infinity (a finite loss can
    still have them), so no checkpoint ever holds weights that such a step corrupted."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all():
            raise diverged("the gradients became NaN or infinite", state.global_step, args.output_dir)


def write_run_state(checkpoint: Path, step: int, totals: dict[str, float]) -> None:
    """``run_state.json`` into a (staged) checkpoint: the run's totals, and the size of every file."""
    files = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*")) if f.is_file()}
    write_atomic(checkpoint / RUN_STATE, json.dumps({"step": step, **totals, "files": files}, indent=1))


def read_run_state(checkpoint: Path) -> dict[str, Any] | None:
    """What :func:`write_run_state` wrote (None for a checkpoint written before it existed)."""
    path = checkpoint / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None. Checks, without loading anything:
    every file ``run_state.json`` lists is there with its size; the trainer state parses; each
    torch file (optimizer, scheduler, RNG state) passes its zip CRC checks (so every byte of it
    is read); each safetensors file is as long as its header says."""
    try:
        saved = read_run_state(checkpoint)
        for name, size in (saved or {}).get("files", {}).items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, but was saved with {size}"
        state = checkpoint / "trainer_state.json"
        if not state.is_file():
            return "trainer_state.json is missing"
        json.loads(state.read_text())
        for path in sorted(checkpoint.rglob("*")):
            name = str(path.relative_to(checkpoint))
            if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
                if not zipfile.is_zipfile(path):
                    if path.suffix == ".bin":
                        continue  # a legacy pickle: nothing to check it against
                    return f"{name} is not a complete torch file (cut short?)"
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{name} is damaged: its part {bad} fails its checksum"
            elif path.suffix == ".safetensors" and path.is_file():
                with path.open("rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = json.loads(handle.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if path.stat().st_size != 8 + length + end:
                    return f"{name} has {path.stat().st_size} bytes, but its header describes {8 + length + end}"
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile) as err:
        return f"cannot be read: {err}"
    return None


def latest_good_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that :func:`checkpoint_problem` finds nothing wrong
    with, and the newer ones it skipped, each with what is wrong with it."""
    damaged = []
    for checkpoint in sorted(_checkpoints(root) if root.is_dir() else [], key=_step, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def _checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (staging folders never count)."""
    found = _checkpoints(root) if root.is_dir() else []
    return max(found, key=_step) if found else None


class ProgressAndLog(TrainerCallback):
    """A progress bar showing loss and tokens/s, and every log entry appended to a JSON-lines file."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self.bar = None
        self._mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True
            )
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        if self._mark is not None and now > self._mark[0] and "loss" in logs:
            entry["tokens_per_s"] = (seen - self._mark[1]) / (now - self._mark[0])
        self._mark = (now, seen)
        with self.log_file.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{entry.get('tokens_per_s', 0):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
