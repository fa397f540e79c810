"""``grouped``: every expert product of a call in one ``torch.nn.functional.grouped_mm`` each.

Rows (token, expert pairs) sorted by expert, one grouped product per projection, no host sync
on CUDA. The fastest backend from a few dozen rows up on GPU, and on CPU with gradients on or up to
a few dozen rows per expert (BENCHMARKS.md).

Forced (path ``grouped``), every run of a call goes through grouped_mm, or the call is refused.
Under ``auto`` it is taken when grouped_mm can take at least one run, and each run goes where it
is faster: grouped_mm if it takes the run's operands and, on CPU without gradients, the run is
neither decode-sized nor large; the loop otherwise, which goes expert by expert for large runs (a
``slim`` form whose ``r`` gives unaligned rows keeps its main experts on grouped_mm).
"""

from __future__ import annotations

import torch

from ..routing import Call, ExpertRun
from .base import Backend
from .products import by_expert, grouped_mm_reason, run_all


class Grouped(Backend):
    name = "grouped"

    def unavailable(self, call: Call) -> str | None:
        reason = super().unavailable(call) or grouped_mm_reason(call.x, call.runs)
        if reason is None or call.layer.path == self.name:
            return reason
        return reason if all(grouped_mm_reason(call.x, [run]) for run in call.runs) else None

    def preferred(self, call: Call) -> bool:
        # Only a decode-sized call goes to the loop whole: in a large call, each run is placed by its own
        # size in run() (a compressed-experts call's auxiliary run may be mid-sized, where grouped_mm wins).
        return not _decode_sized(call.x, call.main_rows, call.layer.down_proj.shape[0])  # rows held, as compiled

    def run(self, call: Call) -> torch.Tensor:
        layer, x = call.layer, call.x
        return run_all(x, call.runs, layer.act_fn, grouped=True if layer.path == self.name else placed(x, call.runs))


def placed(x: torch.Tensor, runs: list[ExpertRun]) -> list[bool]:
    """Where ``auto`` puts each run: grouped_mm (True) where it takes the run and is faster, else the loop."""
    return [grouped_mm_reason(x, [run]) is None and not _loop_faster(x, run) for run in runs]


def _decode_sized(x: torch.Tensor, rows: int, num_experts: int) -> bool:
    """Decode-sized inference on CPU (a row per 4 experts or fewer): grouped_mm visits every expert,
    empty ones included, with per-expert bookkeeping; looping over the experts that have rows is
    cheaper (one host sync). Not with gradients on: a training step at one token measured 1.8x
    slower through the loop than through grouped_mm, whose backward the loop's does not match."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and rows * 4 <= num_experts


def _loop_faster(x: torch.Tensor, run: ExpertRun) -> bool:
    """Where the loop beats grouped_mm for one run: decode-sized inference on CPU (:func:`_decode_sized`),
    or large (:func:`by_expert`: 64 computed rows per expert and more, where the loop runs each
    expert's whole MLP while its rows are in cache)."""
    return _decode_sized(x, run.index.numel(), run.experts) or by_expert(x, run)
