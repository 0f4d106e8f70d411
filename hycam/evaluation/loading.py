"""The model an evaluation scores: a trained checkpoint of `main.py` rebuilt on its base model, or the
untrained base model, loaded the same way (dtype, device, tokenizer) so that their numbers compare.

A checkpoint's files are read once (`read_checkpoint`) and what they hold is passed on: the records
are chosen from it before any model loads, so that bad data fails fast. Every failure to load is a
`UsageError` of one line naming what could not be loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from hycam import files
from hycam.baselines import methods
from hycam.baselines.methods import MethodOptions
from hycam.checkpoint import read_config, read_json
from hycam.config import HyCAMConfig
from hycam.data.models import load_model, load_tokenizer, resolve
from hycam.evaluation.selection import UsageError


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint dir of `main.py` and what it records, read without loading any model."""

    path: Path
    """The checkpoint dir (e.g. RUN/best) as the user named it: errors name it so."""
    method: dict
    """Its method.json, checked (`hycam.baselines.methods.read_method`)."""
    run: dict
    """The run's run_config.json, from the checkpoint dir or up to two levels above; {} if there is none."""

    @property
    def recorded(self) -> dict:
        """What the run recorded: run_config.json overridden by method.json."""
        return {**self.run, **self.method}


def read_checkpoint(checkpoint: str | Path) -> Checkpoint:
    """The checkpoint's method.json and its run's run_config.json, each read once."""
    here = Path(checkpoint).resolve()
    if not here.is_dir():
        raise UsageError(f"--checkpoint {checkpoint}: no such directory")
    try:
        method = methods.read_method(here)
        _check_types(method["options"], MethodOptions, Path(checkpoint) / files.METHOD, "options.")
        if (here / files.HYCAM_CONFIG).is_file():
            saved = read_config(here).get("hycam_config")
            _check_types(saved, HyCAMConfig, Path(checkpoint) / files.HYCAM_CONFIG, "hycam_config.")
        config = next((d / files.RUN_CONFIG for d in (here, here.parent, here.parent.parent)
                       if (d / files.RUN_CONFIG).is_file()), None)
        return Checkpoint(Path(checkpoint), method, read_json(config) if config else {})
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err


def _check_types(values, cls: type, file: Path, prefix: str) -> None:
    """Refuses a value of the wrong JSON type (`"rank": "4"`): the method would fail on it later, deep in
    building the model, without naming the file."""
    if not isinstance(values, dict):
        raise UsageError(f"{file}: {prefix.rstrip('.')} is {values!r}, not a JSON object")
    hints = get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _fits(value, hints[name]):
            raise UsageError(f"{file}: {prefix}{name} is {value!r}, not of type {_shown(hints[name])}")


def _fits(value, hint) -> bool:
    """Whether a JSON value is of the type `hint` (an int is a float too; a bool is neither)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (Union, UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _shown(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def load_model_for(checkpoint: Checkpoint | None, base_model: str | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, revision: str | None = None,
                   quantization: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode on `device`: the checkpoint's method on `base_model` (default: the
    recorded one, at its recorded revision), or without a checkpoint the untrained `base_model`; quantized as
    `quantization` says (default: as the run's base was)."""
    try:
        if checkpoint:
            model, tokenizer = _trained(checkpoint, base_model, dtype, revision, quantization)
        else:
            model, tokenizer = _base(base_model, None, dtype, revision, quantization or "none")
        return model.to(device).eval(), tokenizer
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = (f"checkpoint {checkpoint.path} on base model {base_model or '(recorded)'}" if checkpoint
                else f"base model {base_model}")
        raise UsageError(f"cannot load {what}: {first_line}") from err


def _trained(checkpoint: Checkpoint, base_model: str | None, dtype: torch.dtype, revision: str | None,
             quantization: str | None) -> tuple[nn.Module, object]:
    """The base model is loaded in `dtype` before the method is added, so that the method's modules are
    built in that dtype too (they take the dtype of the layer they join)."""
    model_name = base_model or checkpoint.method.get("model")
    if model_name is None:
        raise ValueError(f"{checkpoint.path}: the base model is not recorded; pass it explicitly")
    recorded = base_model is None  # the run's own base: its GGUF file and revision too
    gguf = checkpoint.method.get("gguf_file") if recorded else None
    revision = revision or (checkpoint.method.get("revision") if recorded else None)
    quantization = quantization or checkpoint.method.get("quantization", "none")
    model, tokenizer = _base(model_name, gguf, dtype, revision, quantization)
    return methods.load_into(model, checkpoint.path, checkpoint.method), tokenizer


def _base(model_name: str, gguf: str | None, dtype: torch.dtype, revision: str | None,
          quantization: str) -> tuple[nn.Module, object]:
    # A GGUF file is de-quantised to float32 (transformers warns against asking it for another dtype).
    packed = resolve(model_name, gguf)[1] is not None
    model = (load_model(model_name, gguf, quantization=quantization).to(dtype) if packed
             else load_model(model_name, gguf, dtype, revision, quantization))
    return model, load_tokenizer(model_name, gguf, revision)
