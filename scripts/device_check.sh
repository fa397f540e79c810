#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the GPU benchmark. Results go to $OUT
# (and come back to be committed under benchmarks/). Usage: bash scripts/device_check.sh
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT="${OUT:-out/device}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layer.py tests/test_numerics.py 2>&1 | tail -15 | tee "$OUT/pytest.txt"
python3 -m compressed_experts bench --device cuda --out-dir "$OUT" --doc "$OUT/BENCHMARKS.md" 2>&1 | tail -40
