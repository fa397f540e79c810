"""Held-out loss of the bundled model pruned to KEEP experts per block, by criterion (and a random draw).

The table in docs/pruning.md: run from the repository root, ``python scripts/prune_measure.py [--out rows.json]``
(a few minutes on two cores). Calibration on the bundled corpus's training files (16384 tokens, seq 256),
loss on its held-out files (32 sequences of 256 tokens), float32, CPU; seed 0 for the main table,
seeds 1 and 2 for the other calibration draws at keep 32 and 16.
"""

import argparse
import json

import torch

import compressed_experts as ce
from compressed_experts.fit import calibration_blocks
from compressed_experts.prune import expert_scores, kept_experts, remove_experts
from compressed_experts.toy.pretrain import lm_loss
from compressed_experts.toy.tasks import domain_split


def pruned_loss(scores, keep, criterion, tok, held, generator=None):
    model = ce.from_pretrained("bundled", dtype="float32")
    if criterion == "random":
        kept = {n: sorted(torch.randperm(64, generator=generator)[:keep].tolist()) for n in scores}
    else:
        kept = {n: kept_experts(s[criterion], keep) for n, s in scores.items()}
    remove_experts(model, kept)
    counts = ce.active_parameters(model)
    return {"loss": lm_loss(model, tok, held, 256, 32), "total": counts["total"], "active": counts["active"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="prune_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, held = domain_split()
    tok = ce.load_tokenizer("bundled")
    base = ce.from_pretrained("bundled", dtype="float32")
    rows = [{"seed": 0, "keep": 64, "criterion": "-", "loss": lm_loss(base, tok, held, 256, 32)}]
    top_m = ce.from_pretrained("bundled", n_ce=4, form="none", dtype="float32")
    rows.append(
        {"seed": 0, "keep": 64, "criterion": "top-4 (n_ce=4, form none)", "loss": lm_loss(top_m, tok, held, 256, 32)}
    )
    scores = expert_scores(base, calibration_blocks(tok, train, seq_len=256, tokens=16384, seed=0))
    generator = torch.Generator().manual_seed(0)
    for keep in (48, 32, 24, 16, 8):
        for criterion in ("saliency", "mass", "frequency", "random"):
            rows.append(
                {
                    "seed": 0,
                    "keep": keep,
                    "criterion": criterion,
                    **pruned_loss(scores, keep, criterion, tok, held, generator),
                }
            )
            print(rows[-1], flush=True)
    for seed in (1, 2):
        scores = expert_scores(base, calibration_blocks(tok, train, seq_len=256, tokens=16384, seed=seed))
        for keep in (32, 16):
            for criterion in ("saliency", "mass"):
                rows.append(
                    {
                        "seed": seed,
                        "keep": keep,
                        "criterion": criterion,
                        **pruned_loss(scores, keep, criterion, tok, held),
                    }
                )
                print(rows[-1], flush=True)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
