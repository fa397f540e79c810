"""``grouped``: every expert product of a call in one ``torch.nn.functional.grouped_mm`` each.

Rows (token, expert pairs) sorted by expert, one grouped product per projection, no host sync
on CUDA. The fastest backend from a few dozen rows up on both CPU and GPU (BENCHMARKS.md).

Forced (path ``grouped``), every run of a call goes through grouped_mm, or the call is refused.
Under ``auto`` it is taken when grouped_mm can take at least one run, and each run goes where it
is faster: grouped_mm if it takes the run's operands and, on CPU without gradients, the run is neither
decode-sized nor large (there the loop goes expert by expert), the loop otherwise (a ``slim`` form whose ``r`` gives unaligned rows keeps its main experts on
grouped_mm).
"""

from __future__ import annotations

import torch

from ..routing import Call
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
        return not _loop_faster(call.x, call.main_rows, call.layer.num_experts)

    def run(self, call: Call) -> torch.Tensor:
        layer, x = call.layer, call.x
        if layer.path == self.name:
            choices = True
        else:
            choices = [
                grouped_mm_reason(x, [run]) is None and not _loop_faster(x, run.index.numel(), layer.num_experts)
                for run in call.runs
            ]
        return run_all(x, call.runs, layer.act_fn, layer.num_experts, grouped=choices)


def _loop_faster(x: torch.Tensor, rows: int, num_experts: int) -> bool:
    """Where the loop beats grouped_mm: inference on CPU, at either end of the sizes.

    Decode-sized (a row per 4 experts or fewer): grouped_mm visits every expert, empty ones
    included, with per-expert bookkeeping; looping over the experts that have rows is cheaper (one
    host sync). Large (:func:`by_expert`: 64 rows per expert or more, 512 tokens of OLMoE's top-8
    over 64 experts): the loop runs each expert's whole MLP while its rows are in cache, which
    grouped_mm's projection-by-projection passes cannot; at 1,024-2,048 tokens (OLMoE layer, two
    threads) 3-5% faster in bfloat16, 15% in float32, while at 32 rows per expert the loop was 3-5%
    slower. Not with gradients on: a training step at one token measured 1.8x slower through the
    loop than through grouped_mm, whose backward the loop's does not match."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return rows * 4 <= num_experts or by_expert(x, rows, num_experts)
