"""``loop``: one matmul per expert that has rows, with one host sync per call.

Runs anywhere PyTorch does (any dtype, any alignment). For large inference calls on CPU it runs
each expert's whole MLP before the next (products.py). ``auto`` takes it for decode-sized calls on
CPU, where it beats grouped_mm, and wherever grouped_mm cannot take the operands; the grouped
backend hands it the large CPU inference runs.
"""

from __future__ import annotations

import torch

from ..routing import Call
from .base import Backend
from .products import run_all


class Loop(Backend):
    name = "loop"

    def run(self, call: Call) -> torch.Tensor:
        layer = call.layer
        return run_all(call.x, call.runs, layer.act_fn, grouped=False)
