"""``none``: the auxiliary experts are dropped. The top-m baseline through the same code path as
the other forms, so the two are compared fairly: no parameters, main weights not renormalised."""

from __future__ import annotations

from ..routing import ExpertRun, Split
from .base import Form, expert, main_run, weighted_sum


class NoForm(Form):
    name = "none"
    rank = 1
    help = "nothing: the auxiliary experts are dropped (the top-m baseline)"
    backends = ("eager", "grouped", "loop", "decode", "fused")

    def runs(self, layer, split: Split) -> list[ExpertRun]:
        return [main_run(layer, split)]

    def token_output(self, layer, x, main, aux):
        return weighted_sum(main, lambda e: expert(layer, e, x))
