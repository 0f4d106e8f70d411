"""A run's resume state: its trained weights, optimizer and schedule state, and where the loop is.

``resume/`` holds
- ``trained.safetensors``: the trained parameters, whole (gathered under ZeRO-3), by name;
- ``optimizer-rank{r}.safetensors``: the torch optimizer's state on rank r: its parameters (the
  fp32 master copies DeepSpeed partitions across ranks under ZeRO and BF16, the trained parameters
  themselves otherwise) and their AdamW moments, with its hyperparameters as JSON metadata;
- ``state.json``: where the loop is, the schedule's state, the world size and the run's identity
  (its options that change what it computes: a state copied from another run is refused by them).
Nothing is pickled: tensors load with safetensors, the rest is JSON, so loading runs no code.
The frozen backbone is not in it. No RNG state either: the loop reseeds torch at every optimizer
step from (seed, step, rank) and a run resumes only at a step boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hycam.checkpoint import copy_verified, gather_tensors, read_json
from hycam.train.rundir import RunDirError, option_name

STATE, TRAINED = "state.json", "trained.safetensors"


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO / BF16 wrappers (or the engine's own)."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def masters(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for: ZeRO-3's flat fp32 partitions (which it puts
    into the optimizer's groups only while stepping), else the optimizer's parameters."""
    partitions = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if partitions is not None:
        return list(partitions)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def write(directory: Path, engine, trained: dict[str, nn.Parameter], progress: dict, rank: int,
          world: int, run: dict) -> None:
    """Writes the resume state into the existing empty `directory` (every rank calls this)."""
    whole = gather_tensors(trained)  # a collective under ZeRO-3
    optimizer, tensors = base_optimizer(engine), {}
    for index, master in enumerate(masters(engine)):
        tensors[f"param.{index}"] = master.detach().to("cpu", copy=True).contiguous()
        for key, value in optimizer.state.get(master, {}).items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}, not a tensor")
            tensors[f"state.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    save_file(tensors, directory / _optimizer_file(rank), metadata={"param_groups": json.dumps(groups)})
    if rank == 0:
        save_file(whole, directory / TRAINED, metadata={"format": "pt"})
    dist.barrier()  # state.json last: a directory with it is complete
    if rank == 0:
        meta = {"progress": progress, "scheduler": engine.lr_scheduler.state_dict(), "world_size": world, "run": run}
        (directory / STATE).write_text(json.dumps(meta, indent=2) + "\n")


def read(directory: Path, engine, trained: dict[str, nn.Parameter], rank: int, world: int, run: dict) -> dict:
    """Loads the resume state of `directory` into the engine, if the run that saved it is `run`; returns the
    recorded progress."""
    if not (directory / STATE).is_file():
        raise RunDirError(f"{directory} holds no {STATE}: not a resume state of this hycam (older ones held "
                          "DeepSpeed's pickled state, which is not loaded); start a new --output_dir")
    meta = _read_state(directory / STATE)
    _check_run(directory / STATE, meta.get("run", run), run)  # states of hycam <= 0.2 record no run
    if meta.get("world_size") != world:
        raise RunDirError(f"{directory}: saved by {meta.get('world_size')} processes, resumed on {world}")
    _copy(trained, _load(directory / TRAINED), directory / TRAINED)
    optimizer, file = base_optimizer(engine), directory / _optimizer_file(rank)
    tensors, own = _load(file), masters(engine)
    # detached: ZeRO-3 marks its flat fp32 partitions like partitioned parameters (ds_id), but each is this
    # rank's own and is copied as it is, not gathered
    _copy({f"param.{i}": p.detach() for i, p in enumerate(own)},
          {k: v for k, v in tensors.items() if k.startswith("param.")}, file)
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            optimizer.state[own[int(index)]][name] = value.to(own[int(index)].device)
    _set_hyperparameters(file, optimizer)
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    engine.global_steps = meta["progress"]["step"]
    return meta["progress"]


def _check_run(file: Path, saved: dict, run: dict) -> None:
    """Refuses a state another run saved (copied in, or the folder reused), naming what differs."""
    differ = [f"{option_name(name)} {saved[name]!r} (this run: {run[name]!r})" for name in run
              if name in saved and saved[name] != run[name]]
    if differ:
        raise RunDirError(f"{file}: saved by another run: {', '.join(differ[:3])}; resume the run that saved it "
                          "with its own options, or start this one in a new --output_dir")


def _optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank}.safetensors"


def _set_hyperparameters(file: Path, optimizer: torch.optim.Optimizer) -> None:
    """The saved learning rate and the rest of each group, with the tuples JSON made lists (betas)."""
    with safe_open(file, "pt") as handle:
        saved = json.loads(handle.metadata()["param_groups"])
    if len(saved) != len(optimizer.param_groups):
        raise RunDirError(f"{file}: {len(saved)} parameter groups, the optimizer has {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in values.items()})


def _copy(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], file: Path) -> None:
    """`copy_verified`, its refusal a RunDirError: the command line stops with exit code 2."""
    try:
        copy_verified(params, tensors, file)
    except ValueError as err:
        raise RunDirError(str(err)) from None


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as err:
        raise RunDirError(f"{file}: cannot read the resume state ({err})") from None


def _read_state(file: Path) -> dict:
    try:
        return read_json(file)
    except (OSError, ValueError) as err:
        raise RunDirError(f"{file}: cannot read the resume state ({err})") from None
