"""``grouped``: every expert product of a call in one ``torch.nn.functional.grouped_mm`` each.

Rows (token, expert pairs) sorted by expert, one grouped product per projection, no host sync
on CUDA. The fastest backend from a few dozen rows up on both CPU and GPU (BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from ..routing import Call
from .base import Backend
from .products import grouped_mm_reason, run_all


class Grouped(Backend):
    name = "grouped"
    help = "torch's grouped_mm, all experts in one product (needs 16-byte aligned rows; Ampere or newer on CUDA)"

    def unavailable(self, call: Call) -> str | None:
        return super().unavailable(call) or grouped_mm_reason(call.x, call.runs)

    def preferred(self, call: Call) -> bool:
        # Decode-sized calls on CPU: grouped_mm there visits every expert, empty ones included, with
        # per-expert bookkeeping; looping over the experts that have rows is cheaper (one host sync).
        return not (call.x.device.type == "cpu" and call.main_rows * 4 <= call.layer.num_experts)

    def run(self, call: Call) -> torch.Tensor:
        layer = call.layer
        return run_all(call.x, call.runs, layer.act_fn, layer.num_experts, grouped=True)
