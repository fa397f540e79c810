"""Can the bundled model's pretraining carry an exact-match task? Next-line completion, untuned.

The issue suggests a task that leans on what pretraining taught, where dropping half of the
routed experts should hurt more than on arithmetic learned during fine-tuning. Before building
one, this script asks whether the pretrained model knows enough for exact match at all: it
completes held-out lines of the standard library's test suite (the domain task's held-out files)
greedily from the 200 tokens before them, as full top-8 and as top-4, and prints the share of
lines reproduced exactly (leading and trailing spaces ignored). RESULTS.md reports its run.

    python scripts/next_line_probe.py [--lines 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import random

import torch

import compressed_experts as ce
from compressed_experts.toy.tasks import domain_split


def sample_lines(count: int, seed: int, tokenizer) -> list[tuple[list[int], str]]:
    """``count`` (context token ids, next line) pairs from held-out files, lines of 8+ characters
    after the 20th line of files of 30+ lines."""
    rng, held, items = random.Random(seed), domain_split()[1], []
    while len(items) < count:
        lines = rng.choice(held).split("\n")
        if len(lines) < 30:
            continue
        i = rng.randrange(20, len(lines))
        if len(lines[i].strip()) >= 8:
            items.append((tokenizer("\n".join(lines[:i]) + "\n")["input_ids"][-200:], lines[i].strip()))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = ce.load_tokenizer("bundled")
    items = sample_lines(args.lines, args.seed, tokenizer)
    models = {
        "full top-8": ce.from_pretrained("bundled"),
        "top-4": ce.convert(ce.from_pretrained("bundled"), ce.CEConfig(n_ce=4, form="none")),
    }
    for name, model in models.items():
        right = 0
        with torch.no_grad():
            for ids, line in items:
                out = model.eval().generate(
                    torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                right += tokenizer.decode(out[0, len(ids) :]).split("\n")[0].strip() == line
        print(f"{name}: {right}/{len(items)} held-out lines completed exactly ({right / len(items):.1%})")


if __name__ == "__main__":
    main()
