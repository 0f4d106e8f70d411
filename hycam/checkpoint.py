"""Save and load HyCAM's weights only: a JSON config beside one safetensors file.

Loading executes nothing from the checkpoint (safetensors, JSON) and refuses a checkpoint made
for another model family, size or HyCAM configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hycam.config import HyCAMConfig
from hycam.inject import apply, hycam_parameters, is_applied

CONFIG_NAME = "hycam_config.json"
WEIGHTS_NAME = "hycam_model.safetensors"


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yields a temporary directory that replaces `path` only once the block has finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Makes ZeRO-3 partitioned parameters whole for the block; a no-op for ordinary ones."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def base_model_signature(model: nn.Module) -> dict:
    config = model.config
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


def save(model: nn.Module, path: str | Path) -> None:
    """Writes `hycam_config.json` and `hycam_model.safetensors` to the directory `path`, atomically."""
    tensors = gather_tensors(hycam_parameters(model))
    write_checkpoint(path, tensors, WEIGHTS_NAME, {CONFIG_NAME: hycam_meta(model)})


def hycam_meta(model: nn.Module) -> dict:
    return {"hycam_config": model.hycam_config.to_dict(), "base_model": base_model_signature(model)}


def gather_tensors(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of `params`, gathered first if ZeRO-3 partitioned them (a collective call)."""
    with gathered(list(params.values())):
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
    empty = [name for name, t in tensors.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors (partitioned and not gathered?): {empty[:3]}")
    return tensors


def write_checkpoint(path: str | Path, tensors: dict, weights_name: str, json_files: dict[str, dict]) -> None:
    """Rank 0 writes the tensors and the JSON files into the directory `path`, atomically."""
    if not _is_writer():
        return
    with atomic_directory(path) as tmp:
        save_file(tensors, tmp / weights_name, metadata={"format": "pt"})
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads HyCAM weights saved by `save`; applies HyCAM first if the model has none yet."""
    path = Path(path)
    meta = read_config(path)
    config = HyCAMConfig.from_dict(meta["hycam_config"])
    expected, actual = meta["base_model"], base_model_signature(model)
    if expected != actual:
        raise ValueError(f"{path} was saved for base model {expected}, not for this one {actual}")
    if not is_applied(model):
        apply(model, config)
    elif model.hycam_config != config:
        raise ValueError(f"{path} holds HyCAM {config}, but this model has HyCAM {model.hycam_config}")
    _copy_into(hycam_parameters(model), load_file(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
    return model


def read_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no HyCAM checkpoint at {path}: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not {"hycam_config", "base_model"} <= set(meta):
        raise ValueError(f"{file}: expected the keys 'hycam_config' and 'base_model'")
    return meta


def _copy_into(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], file: Path) -> None:
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{file} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with gathered(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise ValueError(f"{file}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(param.shape)}")
            param.copy_(tensors[name])


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
