"""Probe for RESULTS.md ("Every method at matched budgets"): the planner at budget 4 with larger subset candidates.

The methods study plans with the planner's default candidates (``none``, ``subset`` at r = I/8 and I/4),
and its plan, fitted as ``slim``, trails uniform ``slim`` at ``n_ce`` 7, r 41. This asks whether
larger candidates change that: ``python scripts/planner_probe.py [--r 24,48] [--seed 0]`` plans the bundled
model at 4 expert-equivalents on the study's calibration draw (the first 8,192 of 16,384 tokens), fits the
plan as ``slim`` (subset blocks become slim) and prints its held-out loss beside the study's references.
"""

import argparse
import copy
from dataclasses import replace

import torch

import compressed_experts as ce
from compressed_experts.fit import calibration_blocks
from compressed_experts.plan import PlanConfig, plan
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", default="24,48")
    parser.add_argument("--budget", default="4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = ce.load_tokenizer("bundled")
    base = ce.from_pretrained("bundled", dtype=torch.float32)
    calibration, held = domain_split()
    blocks = calibration_blocks(tok, calibration, 256, 16384, args.seed)
    planned = plan(copy.deepcopy(base), blocks[:32], PlanConfig(budget=args.budget, r=args.r), frontier=())
    print("plan:", [(c.rule, c.form, c.r) for c in planned.layers], f"{planned.expert_equivalents:.3f}", flush=True)
    for name, layers in (
        ("planned, fitted", planned.layers),
        ("planned, slim fitted", [replace(c, form="slim") if c.form == "subset" else c for c in planned.layers]),
    ):
        model = ce.convert(copy.deepcopy(base), list(layers))
        ce.fit(model, blocks, seed=args.seed, progress=False)
        print(name, f"held-out loss {lm_loss(model, tok, held, 256, 32):.4f}", flush=True)


if __name__ == "__main__":
    main()
