"""Save and load HyCAM's weights only: a JSON config beside one safetensors file.

Saving writes its own files and nothing else: other files in the directory (a Trainer's, a
tokenizer's) stay. Loading executes nothing from the checkpoint (safetensors, JSON), checks every
field and tensor before it changes the model, and leaves the model as it was when it fails. It reads
`hycam.save`'s files, peft's `adapter_config.json` + `adapter_model.safetensors` of a HyCAM adapter,
and a full state dict (`model.safetensors` of `Trainer.save_model` on a HyCAM model), of this version
(`hycam.save` and full state dicts under the model's names, `...self_attn.hycam_modules.default.W_in`; peft's
files without the adapter name) or of hycam 0.1.0 (`hycam.legacy`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hycam import legacy
from hycam.config import HyCAMConfig
from hycam.files import FULL_WEIGHTS, HYCAM_CONFIG, HYCAM_WEIGHTS, PEFT_CONFIG, PEFT_KEY_PREFIX, PEFT_WEIGHTS
from hycam.inject import apply, checkpoint_name, hycam_parameters, is_applied, remove


@contextlib.contextmanager
def staged_files(path: str | Path):
    """Yields an empty directory; once the block has finished, each file in it replaces the file of
    that name in `path` (made if missing). Files of `path` with other names are never touched, and
    an interrupted block changes nothing."""
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hycam-save-", dir=path))
    try:
        yield tmp
        for file in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json"):  # JSON last: it names the weights
            os.replace(file, path / file.name)
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


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """An FSDP2 (`fully_shard`) parameter: a DTensor, whose storage is this rank's shard only."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4: no FSDP2
        return False
    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole on every rank: an FSDP2 shard gathered (a collective), anything else as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _laid_out_as(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole) as `param` holds it: this rank's shard of it for an FSDP2 parameter. Every rank read
    the file, so each takes its own shard without communicating."""
    if not _is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def base_model_signature(model: nn.Module) -> dict:
    config = model.config
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


def save(model: nn.Module, path: str | Path) -> None:
    """Writes `hycam_config.json` and `hycam_model.safetensors` into the directory `path`; other files
    there are kept. Each file is replaced whole: a reader never sees half a file."""
    tensors = gather_tensors(hycam_parameters(model))
    write_checkpoint(path, tensors, HYCAM_WEIGHTS, {HYCAM_CONFIG: hycam_meta(model)})


def hycam_meta(model: nn.Module) -> dict:
    return {"hycam_config": model.hycam_config.hycam_dict(), "base_model": base_model_signature(model)}


def gather_tensors(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of `params`, gathered first if ZeRO-3 or FSDP2 sharded them (a collective call)."""
    with gathered(list(params.values())):
        tensors = {name: whole(p.detach()).to("cpu", copy=True).contiguous() for name, p in params.items()}
    empty = [name for name, t in tensors.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors (partitioned and not gathered?): {empty[:3]}")
    return tensors


def write_checkpoint(path: str | Path, tensors: dict, weights_name: str, json_files: dict[str, dict]) -> None:
    """Rank 0 writes the tensors and the JSON files into the directory `path` (see `staged_files`)."""
    if not _is_writer():
        return
    with staged_files(path) as tmp:
        write_files(tmp, tensors, weights_name, json_files)


def write_files(directory: Path, tensors: dict, weights_name: str, json_files: dict[str, dict]) -> None:
    """The tensors as one safetensors file and each JSON file, written plainly into `directory`."""
    save_file(tensors, directory / weights_name, metadata={"format": "pt"})
    for name, content in json_files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def load(model: nn.Module, path: str | Path, config: HyCAMConfig | None = None) -> nn.Module:
    """Loads HyCAM weights into `model`, applying HyCAM first if the model has none yet.

    `path` holds `hycam.save`'s files, a peft HyCAM adapter, or a full state dict with HyCAM's
    tensors in it (`model.safetensors`); the last needs `config`, which no Trainer file records.
    Everything is checked before the model changes; on any failure the model is left as it was.
    """
    path = Path(path).expanduser()
    config, weights = _read_checkpoint(model, path, config)
    names = set(read_tensors(weights, keep=set()))  # the header only: a corrupt file stops here, before any change
    fresh = not is_applied(model)
    if fresh:
        apply(model, config)
    elif model.hycam_config != config:
        raise ValueError(f"{path} holds a different HyCAM than this model's: "
                         f"{'; '.join(config.differences(model.hycam_config))} (checkpoint vs model)")
    try:
        params = hycam_parameters(model)
        full = weights.name == FULL_WEIGHTS  # a whole model's state dict: read HyCAM's tensors only
        tensors = read_tensors(weights, keep=_hycam_names(names, params) if full else None)
        copy_verified(params, model_names(tensors, params, config), weights, allow_extra=full)
    except BaseException:
        if fresh:
            remove(model)
        raise
    return model


def _hycam_names(names: set[str], params: dict[str, nn.Parameter]) -> set[str]:
    """The names of a full state dict that may be HyCAM's: this model's, or those of hycam 0.1.0."""
    return set(params) | {name for name in names if legacy.is_old(name)}


def model_names(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter],
                config: HyCAMConfig) -> dict[str, torch.Tensor]:
    """A file's tensors under the names of `params`: hycam 0.1.0's names upgraded, and the adapter name put
    back into names that hold none (peft's files)."""
    by_checkpoint_name = {checkpoint_name(name): name for name in params}
    upgraded = legacy.upgrade(tensors, config.train_router)
    return {by_checkpoint_name.get(name, name): t for name, t in upgraded.items()}


def _read_checkpoint(model: nn.Module, path: Path, config: HyCAMConfig | None) -> tuple[HyCAMConfig, Path]:
    """The HyCAM config and the weights file of the checkpoint at `path`, checked against `model`."""
    if (path / HYCAM_CONFIG).is_file():
        meta = read_config(path)
        _check_base_model(path / HYCAM_CONFIG, meta["base_model"], base_model_signature(model))
        return _config_from(path / HYCAM_CONFIG, meta["hycam_config"]), path / HYCAM_WEIGHTS
    if (path / PEFT_CONFIG).is_file():
        return _config_from(path / PEFT_CONFIG, read_json(path / PEFT_CONFIG)), path / PEFT_WEIGHTS
    if (path / FULL_WEIGHTS).is_file() and config is not None:
        return config, path / FULL_WEIGHTS
    if (path / FULL_WEIGHTS).is_file():
        raise ValueError(f"{path / FULL_WEIGHTS} is a full state dict, which does not record HyCAM's "
                         f"configuration: pass it, hycam.load(model, path, config=hycam.HyCAMConfig(...))")
    raise FileNotFoundError(f"no HyCAM checkpoint at {path}: none of {HYCAM_CONFIG}, {PEFT_CONFIG}, "
                            f"{FULL_WEIGHTS} is there")


def read_config(path: str | Path) -> dict:
    file = Path(path).expanduser() / HYCAM_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no HyCAM checkpoint at {path}: {HYCAM_CONFIG} is missing")
    meta = read_json(file)
    if not {"hycam_config", "base_model"} <= set(meta):
        raise ValueError(f"{file}: expected the keys 'hycam_config' and 'base_model'")
    return meta


def read_json(file: Path) -> dict:
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _config_from(file: Path, values) -> HyCAMConfig:
    if not isinstance(values, dict):
        raise ValueError(f"{file}: the HyCAM configuration must be a JSON object, got {values!r}")
    if values.get("peft_type", "HYCAM") != "HYCAM":
        raise ValueError(f"{file}: a {values['peft_type']} adapter, not a HyCAM one")
    try:
        return HyCAMConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from err


def _check_base_model(file: Path, expected: dict, actual: dict) -> None:
    differ = [f"{key} {expected.get(key)!r} (this model: {actual.get(key)!r})"
              for key in sorted(set(expected) | set(actual)) if expected.get(key) != actual.get(key)]
    if differ:
        raise ValueError(f"{file}: saved for another base model: {'; '.join(differ)}")


def read_tensors(file: Path, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those named in `keep`, if given), peft's `base_model.model.`
    prefix taken off the names. With `keep` empty it reads only the header: the names, as None."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        with safe_open(file, framework="pt") as reader:
            names = {key.removeprefix(PEFT_KEY_PREFIX): key for key in reader.keys()}
            if keep is not None and not keep:
                return dict.fromkeys(names)
            return {name: reader.get_tensor(key) for name, key in names.items() if keep is None or name in keep}
    except Exception as err:  # safetensors raises its own error types, which differ between versions
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err


def copy_verified(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], file: Path,
                  allow_extra: bool = False) -> None:
    """Copies `tensors[name]` into every `params[name]`, checking first that each parameter has a tensor of
    its shape and, unless `allow_extra`, that no tensor is left over: a ValueError naming `file` and what
    differs, and nothing copied. ZeRO-3 partitioned parameters are gathered around the copy (a collective)."""
    missing = sorted(set(params) - set(tensors))
    unexpected = [] if allow_extra else sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{file} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with gathered(list(params.values()), modifier_rank=0):
        wrong = [f"{name} has shape {tuple(tensors[name].shape)}, the model {tuple(param.shape)}"
                 for name, param in params.items() if tensors[name].shape != param.shape]
        if wrong:
            raise ValueError(f"{file}: {'; '.join(wrong[:3])}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(_laid_out_as(param, tensors[name]))


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
