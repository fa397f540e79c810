"""Held-out loss against measured main experts per token of the bundled model, fixed n_ce and per-token rules.

The table in docs/dynamic-routing.md: run from the repository root, ``python scripts/dynamic_measure.py
[--out rows.json]`` (about a minute on two cores). Form ``none`` (the auxiliary experts dropped, no
training: the rule alone decides), float32, CPU, two threads. Loss, main experts per token and active
parameters on the bundled corpus's held-out files (32 sequences of 256 tokens).
"""

import argparse
import json

import torch

import compressed_experts as ce
from compressed_experts.text import token_blocks
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split

RULES = (
    [{"n_ce": n} for n in (0, 2, 4, 6)]
    + [{"top_p": p} for p in (0.5, 0.7, 0.8, 0.9)]
    + [{"skip_below": s} for s in (0.5, 0.3, 0.2, 0.1)]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dynamic_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, held = domain_split()
    tok = ce.load_tokenizer("bundled")
    blocks = token_blocks(tok, held, 256, 32)
    rows = []
    for rule in RULES:
        model = ce.from_pretrained("bundled", form="none", dtype="float32", **rule).eval()
        counts = ce.active_parameters(model, input_ids=blocks)
        rows.append(
            {
                "rule": ", ".join(f"{k}={v}" for k, v in rule.items()),
                "main_experts_per_token": counts["main_experts_per_token"],
                "active": counts["active"],
                "active_saving": counts["active_saving"],
                "loss": lm_loss(model, tok, held, 256, 32),
            }
        )
        print(rows[-1], flush=True)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
