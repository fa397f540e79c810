#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the CUDA tests, the GPU benchmark (written to
# benchmarks/cuda-<card>.json, from which BENCHMARKS.md is regenerated) and a kernel profile of
# full top-k against compressed experts. Run from the repository root on a machine with a GPU:
#     scripts/gpu_check.sh [folder for logs]    (default gpu-logs)
# Works without installing the package (it falls back to PYTHONPATH=src).
set -uo pipefail
logs=${1:-gpu-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python3 -c "import compressed_experts" 2>/dev/null || export PYTHONPATH=$PWD/src
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"

echo "== tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layer.py 2>&1 | tee "$logs/tests.log" | tail -15

echo "== benchmark"
# One process per part, so that a failure in one part keeps the others' results.
for part in "--shapes olmoe --no-end-to-end" "--shapes phimoe --no-end-to-end" "--shapes none"; do
    timeout 200 python3 -m compressed_experts bench --device cuda --repeats 20 $part 2>&1 | tee -a "$logs/bench.log" | tail -4
done
cp benchmarks/cuda-*.json "$logs"/ 2>/dev/null

echo "== profile"
timeout 90 python3 - <<'PY' 2>&1 | tee "$logs/profile.txt"
import torch
from torch.profiler import ProfilerActivity, profile

from compressed_experts.bench import SHAPES, _variants

variants = _variants(SHAPES["olmoe"], torch.bfloat16, torch.device("cuda"), seed=0)
for count in (1, 512):
    x = torch.randn(1, count, 2048, dtype=torch.bfloat16, device="cuda")
    for name in ("full", "ce", "transformers:grouped_mm"):
        block = variants[name]
        with torch.no_grad():
            for _ in range(3):
                block(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    block(x)
                torch.cuda.synchronize()
        print(f"---- {name}, {count} tokens, forward, 10 calls")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
PY
