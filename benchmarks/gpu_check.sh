#!/usr/bin/env bash
# One-command GPU check of the real pipeline on a ~1B random Llama (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh [--gpus N] [--json FILE] [--cpu-smoke]
# Uses the repository's .venv (bash tools/setup.sh makes it); TORCH_EXTENSIONS_DIR defaults to the
# repository's, so a JIT build is shared with the other commands.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${MASKPRUNE_PYTHON:-$repo/.venv/bin/python}" "$repo/benchmarks/gpu_check.py" "$@"
