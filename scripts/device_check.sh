#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call of at most about 9 minutes (8 3/4 of timeouts):
#   tests   the CUDA tests, the decode kernels' and the fused kernels' (which run on the GPU here);
#   paths   full top-k and compressed experts forced through the grouped, decode and fused paths at
#           1-4,096 tokens, forward and forward+backward, both layer shapes and dtypes: where auto
#           should take which path (benchmarks/<device>-paths.md);
#   layers  the benchmark at 1, 16, 512 and 4,096 tokens, fused variants included, one process per
#           shape (benchmarks/<device>.json, and BENCHMARKS.md regenerated from every result);
#   e2e     end to end, eager, then again with the compiled decode (static cache, torch.compile
#           mode reduce-overhead): the eager figures survive a compile that fails or runs out of time.
# Each part runs under its own timeout, so one that fails or runs out leaves the others' results; its
# log is <logs>/<part>.log, and the logs folder gets a copy of the results. Commit the files written
# under benchmarks/ and BENCHMARKS.md. Run from the repository root:
#     scripts/device_check.sh [logs folder, default gpu-logs]
# Works without installing the package (it falls back to PYTHONPATH=src).
set -uo pipefail
logs=${1:-gpu-logs}
mkdir -p "$logs" benchmarks
export PYTHONUNBUFFERED=1
python3 -c "import compressed_experts" 2>/dev/null || export PYTHONPATH=$PWD/src
nvidia-smi -L
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
device=$(python3 -c "import torch; from compressed_experts.bench import device_key; print(device_key(torch.device('cuda')))")

part() {  # part NAME SECONDS COMMAND...: one part under its timeout, its output in $logs/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout "$seconds" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    tail -n 8 "$logs/$name.log"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ', timed out')"
}

bench() {  # bench NAME SECONDS ARGS...: a part running the benchmark. One cut short left its rows in
    # the .partial file: the next part resumes from them, so they reach the results.
    local resume=
    [ -f "benchmarks/$device.json.partial" ] && resume=--resume
    part "$1" "$2" python3 -m compressed_experts bench --device cuda --repeats 10 $resume "${@:3}"
}

part tests 120 python3 -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py tests/test_decode_kernel.py tests/test_fused_kernel.py tests/test_layer.py

part paths 100 python3 - <<PY
import torch
from compressed_experts.bench import compare_paths

with open("benchmarks/$device-paths.md", "w") as out:
    def line(text):
        print(text)
        out.write(text + "\n")
        out.flush()  # each row as soon as it is measured

    compare_paths(
        ("olmoe", "phimoe"), (torch.bfloat16, torch.float32), (1, 2, 4, 8, 16, 64, 512, 4096),
        ("forward", "forward+backward"), torch.device("cuda"), repeats=10, line=line,
    )
PY

layers=(--tokens 1,16,512,4096 --no-end-to-end)
bench layers-olmoe 70 --shapes olmoe "${layers[@]}"
bench layers-phimoe 70 --shapes phimoe "${layers[@]}"
bench e2e 45 --shapes none --no-compiled-decode
bench e2e-compiled 120 --shapes none --compiled-decode

cp "benchmarks/$device"* BENCHMARKS.md "$logs"/ 2>/dev/null
ls -l "$logs"
