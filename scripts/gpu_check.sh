#!/usr/bin/env bash
# GPU smoke check (at most 8 minutes): a random ~0.5B Qwen2-shaped model in bf16, a few `fit` steps,
# then HF generate vs refine vs jacobi; prints tokens/s and peak memory. Needs a CUDA build of torch:
#   pip install -e . && bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
