"""Compile the ``fused`` backend's Triton kernels for a GPU architecture, on a machine without a GPU.

Triton's interpreter (how the tests run the kernels on a CPU) checks what the kernels compute,
not that the compiler takes them: a construct the interpreter accepts can still fail to compile
for a GPU. Triton compiles ahead of time for any target with the ``ptxas`` it ships, so this
compiles every kernel, in every variant the backend launches (forms, rules, gradients, dtypes),
for sm_90 (H100/H200) and sm_80 (A100), at the largest rows per tile, and reports the shared
memory each tile configuration needs against the card's limit: the autotuner skips one over it at
run time, so a kernel variant none of whose configurations fits is a failure.

    python scripts/compile_kernels.py            # every autotuning configuration, both targets
    python scripts/compile_kernels.py --quick    # the smallest configuration of each, sm_90 only

Exits non-zero if a kernel fails to compile or does not fit. Run without ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud (it warns otherwise)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from compressed_experts.backends import fused

#: Shared memory per block (bytes) the cards allow: H100/H200 227 KB, A100 163 KB.
TARGETS = {"sm_90": (GPUTarget("cuda", 90, 32), 227 * 1024), "sm_80": (GPUTarget("cuda", 80, 32), 163 * 1024)}
#: The OLMoE-1B-7B layer: hidden 2048, intermediate 1024, 64 experts, 4 main of 8.
HIDDEN, INTER, EXPERTS, MAIN, SLOTS = 2048, 1024, 64, 4, 8


def variants(dtype: str):
    """(kernel, argument types, constants) for every variant the backend launches in ``dtype``."""
    p, f32, i64 = f"*{dtype}", "*fp32", "*i64"
    shape = dict(main=MAIN, hidden=HIDDEN, inter=INTER)
    i32 = "*i32"
    tiles = dict(sorted_pair=i32, tile_expert=i32, pairs="i32", num_experts="i32")
    flags = dict(PRECISION="ieee", UPCAST=False, BLOCK_M=128)  # the largest rows per tile: the most shared memory
    for has_ce, rule in ((True, 0), (True, 1), (False, 2)):
        yield (
            fused._route_kernel,
            dict(index=i64, weights=f32, ce_gate=p, ce_up=p, ce_down=p, main_index=i64, main_weights=f32)
            | dict(scale_gate=f32, scale_up=f32, scale_down=f32, threshold="fp32"),
            dict(slots=SLOTS, main=MAIN, num_experts=EXPERTS, hidden=HIDDEN, inter=INTER, RULE=rule, HAS_CE=has_ce)
            | dict(BLOCK_S=SLOTS, BLOCK_K=128),
        )
    yield (
        fused._align_kernel,
        dict(ids=i64, pairs="i32", counts=i32, starts=i32, seen=i32, sorted_pair=i32, tile_expert=i32)
        | dict(tiles="i32", capacity="i32"),
        dict(num_experts=EXPERTS, BLOCK_M=128, BLOCK_E=128, BLOCK_P=128),
    )
    scales = dict(scale_gate=f32, scale_up=f32, scale_down=f32)
    for has_ce, save in itertools.product((True, False), (True, False)):
        yield (
            fused._gate_up_kernel,
            dict(x=p, gate_up=p, inner=p, pre_gate=p, pre_up=p) | scales | tiles,
            shape | flags | dict(HAS_CE=has_ce, SAVE=save),
        )
    yield fused._down_kernel, dict(inner=p, down=p, main_weights=f32, pair_out=f32) | tiles, shape | flags
    for has_ce in (True, False):
        yield (
            fused._down_grad_kernel,
            dict(grad_out=f32, down=p, main_weights=f32, inner=p, pre_gate=p, pre_up=p, scale_down=f32)
            | dict(grad_gate=p, grad_up=p, grad_scale_down=f32, grad_weight=f32)
            | tiles,
            shape | flags | dict(HAS_CE=has_ce),
        )
        yield (
            fused._gate_up_grad_kernel,
            dict(grad_gate=p, grad_up=p, gate_up=p, x=p, scale_gate=f32, scale_up=f32)
            | dict(grad_x=f32, grad_scale_gate=f32, grad_scale_up=f32)
            | tiles,
            shape | flags | dict(HAS_CE=has_ce),
        )
    weight_grad = dict(sorted_pair=i32, starts=i32, counts=i32, out=p, out_expert_stride="i64", pairs="i32")
    for a_sorted, b_scaled, a, b, rows, cols in (
        (True, True, p, p, INTER, HIDDEN),  # gate_up_proj's halves, compressed experts
        (True, False, p, p, INTER, HIDDEN),  # gate_up_proj's halves, plain experts
        (False, False, f32, p, HIDDEN, INTER),  # down_proj
    ):
        yield (
            fused._weight_grad_kernel,
            dict(a=a, b=b, a_weight=f32, b_scale=f32) | weight_grad,
            dict(main=MAIN, R=rows, C=cols, A_SORTED=a_sorted, B_SCALED=b_scaled) | flags,
        )


def configs(kernel, quick: bool):
    """The tile configurations to compile: the autotuner's (the smallest only with ``quick``)."""
    if not isinstance(kernel, Autotuner):
        return [triton.Config({})]
    found = kernel.configs
    if quick:
        return [min(found, key=lambda c: (math.prod(c.kwargs.values()), c.num_stages))]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest configuration of each kernel, sm_90 only")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: under the interpreter there is nothing to compile", file=sys.stderr)
        return 2
    targets = {"sm_90": TARGETS["sm_90"]} if args.quick else TARGETS
    failures, fitting = 0, {}  # fitting: per kernel variant, whether some configuration fits the card
    for (arch, (target, limit)), dtype in itertools.product(targets.items(), ("bf16", "fp32")):
        if args.quick and dtype == "fp32":
            continue
        for kernel, signature, constants in variants(dtype):
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            variant = (arch, dtype, fn.__name__, tuple(sorted((k, v) for k, v in constants.items() if k.isupper())))
            fitting[variant] = False
            for config in configs(kernel, args.quick):
                consts = constants | config.kwargs
                sig = signature | dict.fromkeys(consts, "constexpr")
                missing = sorted(set(fn.arg_names) - set(sig))
                if missing:
                    raise SystemExit(f"{fn.__name__}: no type given for {missing}: update this script")
                what = ", ".join(f"{k}={v}" for k, v in consts.items() if k.isupper() and k != "UPCAST")
                start = time.perf_counter()
                try:
                    options = dict(num_warps=config.num_warps or 4, num_stages=config.num_stages or 3)
                    compiled = triton.compile(ASTSource(fn, sig, consts), target=target, options=options)
                except Exception as err:
                    failures += 1
                    print(f"FAIL {arch} {dtype} {fn.__name__} ({what}): {type(err).__name__}: {err}".splitlines()[0])
                    continue
                shared = compiled.metadata.shared
                fitting[variant] |= shared <= limit
                note = "" if shared <= limit else f"  over the {limit // 1024} KB limit: the autotuner skips it"
                print(
                    f"ok   {arch} {dtype} {fn.__name__} ({what}, warps {options['num_warps']}, stages "
                    f"{options['num_stages']}): shared {shared // 1024} KB, {time.perf_counter() - start:.1f} s{note}"
                )
    for arch, dtype, name, flags in (v for v, fits in fitting.items() if not fits):
        failures += 1
        print(f"FAIL {arch} {dtype} {name} {dict(flags)}: no configuration fits the card's shared memory")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
