"""Does a variant of the demo's math task separate full top-8 from top-4 after fine-tuning?

The issue asks for a generated task on which full top-8 measurably beats top-4 before the demo
builds on it. This script fine-tunes the bundled model on one variant, with the demo's settings
(lr 3e-3 unless told, cosine, 5% warm-up, 16 x 256 packed tokens, float32, response-only loss), and prints
each method's exact match on held-out problems and the share of worked arithmetic lines that are
right (which tells arithmetic errors from skipped or repeated steps). RESULTS.md reports its runs.

    python scripts/math_task_probes.py VARIANT [--steps 300] [--seed 0] [--batch-size 16] [--lr 3e-3]
                                       [--methods full,top-m]

Variants: ``base`` (the demo's task), ``long`` (6 to 8 operations), ``big`` (two-digit operands,
counts up to 200), ``restate`` (4 to 5 operations, each worked line restates its sentence).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from pathlib import Path

from compressed_experts.checkpoint import load_tokenizer
from compressed_experts.evaluation import evaluate
from compressed_experts.sources import BUNDLED
from compressed_experts.toy import tasks
from compressed_experts.training import TrainConfig, train

WORKED = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


#: Two-digit operands (carries on most lines), counts up to 200.
BIG = tasks.Numbers(
    operands=(10, 49), packs=(9, 9), buy_below=150, packs_below=120, double_below=100, divisors=(2, 3, 4, 5)
)

VARIANTS = {
    "base": dict(),
    "long": dict(steps=(6, 8)),
    "big": dict(make=functools.partial(tasks.make_problem, numbers=BIG)),
    "restate": dict(steps=(4, 5), make=functools.partial(tasks.make_problem, restate=True)),
}


def arithmetic_right(outputs: list[str]) -> float:
    """Share of the worked lines ``a op b = c`` in the model's outputs whose ``c`` is right."""
    right = total = 0
    for output in outputs:
        for a, op, b, c in WORKED.findall(output):
            a, b = int(a), int(b)
            want = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else None}[op]
            right, total = right + (want == int(c)), total + 1
    return right / total if total else 0.0


def methods(text: str) -> list[str]:
    """The --methods list, checked before any training starts."""
    chosen = text.split(",")
    unknown = sorted(set(chosen) - {"full", "top-m", "ce"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}: choose from full, top-m, ce")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--methods", default="full,top-m", type=methods, help="comma-separated: full, top-m, ce")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("out/math-probes"))
    args = parser.parse_args()
    out = args.out / f"{args.variant}-{args.steps}steps-bs{args.batch_size}-lr{args.lr:g}-seed{args.seed}"
    train_file = tasks.write_math(
        out / "train.jsonl", tasks.math_problems(args.train, "train", **VARIANTS[args.variant])
    )
    test_file = tasks.write_math_eval(
        out / "test.jsonl", tasks.math_problems(args.test, "test", **VARIANTS[args.variant])
    )
    tokenizer = load_tokenizer(BUNDLED)
    for method in args.methods:
        started = time.perf_counter()
        run = train(
            TrainConfig(
                model=BUNDLED,
                data=str(train_file),
                out=str(out / method),
                method=method,
                n_ce=None if method == "full" else 4,
                ce_lr=3e-2 if method == "ce" else None,
                max_steps=args.steps,
                lr=args.lr,
                seq_len=256,
                batch_size=args.batch_size,
                seed=args.seed,
                precision="fp32",
                gradient_checkpointing=False,
                warmup=0.05,
                overwrite=True,
                response_only=True,
                logging_steps=50,
            )
        )
        result = evaluate(
            run.model.eval(),
            tokenizer,
            "gsm8k",
            data=test_file,
            batch_size=32,
            max_new_tokens=192,
            prompt="alpaca",
            out=out / method / "eval_math.json",
            source=str(out / method),
            progress=False,
        )
        line = {
            "variant": args.variant,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "method": method,
            "exact_match": result["score"],
            "arithmetic_lines_right": arithmetic_right([e["output"] for e in result["examples"]]),
            "seconds": round(time.perf_counter() - started),
        }
        print(json.dumps(line), flush=True)
        with open(args.out / "probes.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
