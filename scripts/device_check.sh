#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the CUDA tests (Triton decode kernels included), a
# table of the decode kernels against the grouped path by token count (what auto's threshold
# rests on), and the GPU benchmark (benchmarks/cuda-<card>.json, from which BENCHMARKS.md is
# regenerated). Run from the repository root on a machine with a GPU:
#     scripts/device_check.sh [folder for logs] [passes to benchmark, default forward,forward+backward]
# Works without installing the package (it falls back to PYTHONPATH=src).
set -uo pipefail
logs=${1:-gpu-logs}
modes=${2:-forward,forward+backward}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python3 -c "import compressed_experts" 2>/dev/null || export PYTHONPATH=$PWD/src
nvidia-smi -L
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"

echo "== tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_decode_kernel.py tests/test_layer.py tests/test_compile.py 2>&1 | tee "$logs/tests.log" | tail -25

echo "== decode kernels against the grouped path (forward, no_grad, median ms of 50 calls)"
timeout 120 python3 - <<'PY' 2>&1 | tee "$logs/decode_paths.txt"
import torch

from compressed_experts.bench import SHAPES, _variants, interleaved_medians

cuda = torch.device("cuda")
for shape in ("olmoe", "phimoe"):
    for dtype in (torch.bfloat16, torch.float32):
        variants = _variants(SHAPES[shape], dtype, cuda, seed=0)
        hidden = variants["full"].experts.hidden_dim
        for count in (1, 2, 4, 8, 16):
            x = torch.randn(1, count, hidden, dtype=dtype, device=cuda)
            runs, outs = {}, {}
            for name in ("full", "ce"):
                for path in ("decode", "grouped"):
                    def run(block=variants[name], path=path):
                        block.experts.path = path
                        return block(x)
                    runs[f"{name}:{path}"] = run
            with torch.no_grad():
                t = interleaved_medians(runs, cuda, repeats=50, warmup=3)
                for name in ("full", "ce"):
                    a, b = runs[f"{name}:decode"]().float(), runs[f"{name}:grouped"]().float()
                    outs[name] = ((a - b).norm() / b.norm()).item()
            print(f"{shape} {str(dtype)[6:]:8} {count:3} tokens | " + " | ".join(
                f"{k} {v * 1e3:.3f}" for k, v in t.items()) + f" | rel. diff decode/grouped full {outs['full']:.1e} ce {outs['ce']:.1e}")
        for block in variants.values():
            if hasattr(block.experts, "path"):
                block.experts.path = "auto"
        del variants
PY

echo "== benchmark"
# One process per part, so that a failure in one part keeps the others' results.
for part in "--shapes olmoe --no-end-to-end" "--shapes phimoe --no-end-to-end" "--shapes none"; do
    timeout 200 python3 -m compressed_experts bench --device cuda --repeats 20 --modes "$modes" $part 2>&1 | tee -a "$logs/bench.log" | tail -4
done
cp benchmarks/cuda-*.json "$logs"/ 2>/dev/null
