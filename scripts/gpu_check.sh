#!/usr/bin/env bash
# GPU readiness check (scripts/gpu_check.py --help): fused path vs the plain formula on CUDA in
# float32 and bfloat16, then step time, peak memory and decoding of floor, HyCAM and peft LoRA on
# random weights of real shapes. Needs torch, transformers, peft, safetensors, pyyaml; no network.
#   bash scripts/gpu_check.sh                     # on a GPU machine, a few minutes
#   bash scripts/gpu_check.sh --device cpu        # the same code on a tiny config, seconds
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's hycam, installed or not
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1        # nothing is downloaded
status=0
python "$repo/scripts/gpu_check.py" "$@" || status=$?

# The 4-bit path, where bitsandbytes is installed (pip install -e '.[quant]'): HyCAM on an NF4 base of the same
# shapes, against bf16 (scripts/gpu_check_quantized.py; writes gpu_check_quantized.json/.md beside the above).
if python -c "import bitsandbytes" 2>/dev/null; then
  python "$repo/scripts/gpu_check_quantized.py" "$@" || status=$?
else
  echo "gpu_check: bitsandbytes is not installed: the 4-bit path is skipped" >&2
fi
exit "$status"
