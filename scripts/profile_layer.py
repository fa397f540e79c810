"""Where one MoE layer's time goes: the profiler's per-op table for each variant of ``compressed-experts bench``.

The analysis in docs/cpu-performance.md: run from the repository root on an idle machine,
``python scripts/profile_layer.py --shape olmoe --dtype bfloat16 --tokens 2048 --variants
transformers:eager,full``. The same layers and weights as the bench (random, seed 0; the input is drawn anew). For
each variant: the median of ``--repeats`` calls timed in turns (as the bench times them), then
PyTorch's profiler over ``--profiled`` more calls, self CPU time per op, the top ``--ops`` rows.
Variants: the bench's (``transformers:eager``, ``transformers:grouped_mm``, ``full``, ``top-m``,
``ce``, ...) and ``<variant>@<path>`` for one of this library's forced onto a compute path
(``full@grouped``, ``full@loop``).
"""

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

from compressed_experts.backends import check_path
from compressed_experts.bench import SHAPES, _runner, _variants, _with_experts, interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="olmoe", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--mode", default="forward", choices=("forward", "forward+backward"))
    parser.add_argument("--variants", default="transformers:eager,transformers:grouped_mm,full")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--ops", type=int, default=12)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device("cpu")
    variants = _variants(SHAPES[args.shape], dtype, device, seed=0)
    blocks = {}
    for name in args.variants.split(","):
        base, _, path = name.partition("@")
        if base not in variants:
            parser.error(f"unknown variant {base!r}; the bench's are {', '.join(variants)}")
        blocks[name] = variants[base]
        if path:
            if base.startswith("transformers:") or base == "dense":
                parser.error(f"{name}: only this library's variants take a compute path")
            check_path(path)
            experts = copy.copy(variants[base].experts)
            experts.path = path
            blocks[name] = _with_experts(variants[base], experts)
    x = torch.randn(1, args.tokens, variants["full"].experts.hidden_dim, dtype=dtype, device=device)
    runs = {name: _runner(block, x, args.mode) for name, block in blocks.items()}
    medians = interleaved_medians(runs, device, args.repeats)
    print(f"{args.shape}, {args.dtype}, {args.tokens} tokens, {args.mode}, {torch.get_num_threads()} threads")
    for name, seconds in medians.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms (median of {args.repeats}, timed in turns)")
    for name, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profiled):
                run()
        print(f"\n{name}, {args.profiled} calls profiled:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
