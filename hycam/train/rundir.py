"""The run directory: owned by one run at a time, swapped in whole, and judged before a run starts.

- ``claim``: rank 0 takes the directory's lock (``hycam.folders.lock``, so a dead run holds none),
  finishes any swap a crash interrupted, and decides whether the run continues from ``resume/``,
  starts over a run that saved nothing, or is refused; every rank learns the answer.
- ``identity``: the options that make a run the run it is; a resume checks them against
  ``run_config.json`` and against the resume state's own record.
- ``staging`` / ``swap_in``: a checkpoint directory (``resume``, ``best``, ``last``) is written
  under ``.NAME.tmp``, renamed to ``.NAME.new`` once complete, then swapped for ``NAME``; at
  every point a crash leaves either the old or the new directory, which ``recover`` puts back.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from hycam.checkpoint import read_json
from hycam.files import BEST, LAST, METRICS, RESUME, RUN_CONFIG, SUMMARY
from hycam.folders import FolderError, lock
from hycam.train.config import TrainConfig
from hycam.train.metrics import TENSORBOARD

CHECKPOINTS = (RESUME, BEST, LAST)
# Options a resumed run may set differently: none of them changes what the run computes.
MAY_CHANGE = {"resume", "halt_after_steps", "local_rank", "log_interval", "output_dir", "dist_timeout",
              "stale_lock_minutes"}


class RunDirError(FileExistsError):
    """The run directory cannot be used as asked (in use, holds another run, nothing to resume)."""


@contextlib.contextmanager
def claim(cfg: TrainConfig, world: int, rank: int, log):
    """Holds --output_dir for this run for the block; yields True if the run continues from resume/.
    A collective call: rank 0 decides, every rank raises RunDirError or enters the block."""
    held, code, message = None, 0, ""
    if rank == 0:
        try:
            held = lock(Path(cfg.output_dir))
            code = int(prepare(cfg, world, log))
        except (RunDirError, FolderError) as err:
            code, message = -1, str(err)
    status = torch.tensor([code])
    dist.broadcast(status, 0)
    try:
        if status.item() < 0:
            raise RunDirError(message or f"rank 0 refused --output_dir {cfg.output_dir} (see its message)")
        yield bool(status.item())
    finally:
        if held is not None:
            held.close()


def prepare(cfg: TrainConfig, world: int, log) -> bool:
    """Readies --output_dir (rank 0 only, under the lock); returns True to continue from resume/."""
    out = Path(cfg.output_dir)
    for note in recover(out):
        log(note)
    recorded = out / RUN_CONFIG
    if cfg.resume:
        if not recorded.is_file():
            raise RunDirError(f"--resume: {out} holds no run to resume ({RUN_CONFIG} is missing)")
        check_same_run(cfg, world, recorded)
        if (out / SUMMARY).is_file():
            raise RunDirError(f"--resume: the run in {out} has finished ({out / SUMMARY}); nothing to resume")
        if (out / RESUME).is_dir():
            return True
        why = (f"{BEST}/ holds trained weights only, no optimizer state" if (out / BEST).is_dir()
               else "the run stopped before its first evaluation")
        log(f"--resume: {out} has no resume state ({why}): starting the run again from step 0")
    elif (out / SUMMARY).is_file():
        raise RunDirError(f"--output_dir {out} holds a finished run ({out / SUMMARY}): evaluate it with "
                          f"{evaluate_command(out / BEST)}, or choose another directory to train again")
    elif any((out / name).exists() for name in CHECKPOINTS):
        raise RunDirError(f"--output_dir {out} already holds a run with checkpoints: pass --resume true to "
                          "continue it, or choose another directory")
    elif recorded.exists() or (out / METRICS).exists():
        log(f"replacing the run in {out}: it stopped before saving any checkpoint")
    for name in (METRICS, SUMMARY, TENSORBOARD):
        _remove(out / name)
    return False


def evaluate_command(checkpoint: Path) -> str:
    """The hycam-eval command line for `checkpoint`, quoted for a shell (paths may hold spaces)."""
    return f"hycam-eval --checkpoint {shlex.quote(str(checkpoint))}"


def check_same_run(cfg: TrainConfig, world: int, recorded_file: Path) -> None:
    """Refuses a resume whose options differ from the recorded run's, naming the first that does."""
    try:
        recorded = read_json(recorded_file)
    except (OSError, ValueError) as err:
        raise RunDirError(f"--resume: cannot read the recorded run: {err}") from None  # err names the file
    for name, value in identity(cfg, world).items():
        if name not in recorded or recorded[name] == value:
            continue
        raise RunDirError(f"--resume: {option_name(name)} is {value!r}, but the run was started with "
                          f"{recorded[name]!r} ({recorded_file}): resume with the recorded value, or start a new "
                          "--output_dir")


def identity(cfg: TrainConfig, world: int) -> dict:
    """What makes a run the run it is: every option that changes what it computes, and its world size."""
    return {name: value for name, value in {**asdict(cfg), "world_size": world}.items() if name not in MAY_CHANGE}


def option_name(name: str) -> str:
    """How a message names an entry of `identity`."""
    return "the number of processes" if name == "world_size" else f"--{name}"


def recover(out: Path) -> list[str]:
    """Finishes or undoes the checkpoint swaps a crash interrupted; returns what it did."""
    notes = []
    for name in CHECKPOINTS:
        final, new, old = out / name, out / f".{name}.new", out / f".{name}.old"
        if new.is_dir():  # complete and newer: finish its swap
            if final.exists():
                _remove(old)
                os.replace(final, old)
            os.replace(new, final)
            notes.append(f"{final}: finished the swap a stop interrupted ({new.name} -> {name})")
        elif not final.exists() and old.is_dir():
            os.replace(old, final)
            notes.append(f"{final}: restored the previous one ({old.name}); its replacement was incomplete")
        for entry in out.glob(".*"):
            if entry.name.lstrip(".").startswith(f"{name}."):  # temporaries of interrupted writes
                _remove(entry)
    return notes


def staging(out: Path, name: str, rank: int) -> Path:
    """An empty .NAME.tmp to write checkpoint NAME into (a collective call)."""
    tmp = out / f".{name}.tmp"
    if rank == 0:
        _remove(tmp)
        tmp.mkdir()
    dist.barrier()
    return tmp


def discard_staging(out: Path, name: str) -> None:
    """Removes .NAME.tmp (a write into it failed)."""
    _remove(out / f".{name}.tmp")


def swap_in(out: Path, name: str, rank: int) -> None:
    """Makes the complete .NAME.tmp the new NAME (a collective call, after every rank wrote its part)."""
    dist.barrier()
    if rank == 0:
        tmp, new, final, old = out / f".{name}.tmp", out / f".{name}.new", out / name, out / f".{name}.old"
        _remove(new)
        os.replace(tmp, new)
        _remove(old)
        if final.exists():
            os.replace(final, old)
        os.replace(new, final)
        _remove(old)
    dist.barrier()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
