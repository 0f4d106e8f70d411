"""The run's checkpoints: best/ and last/ (trained weights to evaluate), resume/ (to continue).

Each is written into rundir's staging folder and swapped in whole (`rundir.staging` / `swap_in`): the
swap is what keeps a checkpoint folder complete, so the files are written into the staging folder
plainly. A disk that fills up during a write leaves the previous checkpoint in place: the staging
folder is removed and the run stops naming what it kept (`DiskFull`); `check_space` refuses a run
whose checkpoints could not fit before it trains.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from safetensors import SafetensorError

from hycam.baselines import methods
from hycam.checkpoint import read_json, write_files
from hycam.files import BEST, LAST, METHOD, METRICS, RESUME
from hycam.train import resume, rundir
from hycam.train.metrics import truncate_metrics
from hycam.train.state import Progress, Run


# Bytes on disk per trained parameter at most: resume/ (weights, fp32 master, two AdamW moments: 16),
# best/ and last/ (4 each), and a second copy of each while it is replaced.
BYTES_PER_PARAMETER = 48


class DiskFull(rundir.RunDirError):
    """--output_dir has no room for the run's checkpoints."""


def check_space(out: Path, trainable: int) -> None:
    """Refuses to train when the checkpoints of `trainable` parameters cannot fit in `out` (less what the
    ones already there take): the run would lose its work at its first save."""
    held = sum(f.stat().st_size for name in (BEST, LAST, RESUME) for f in (out / name).rglob("*") if f.is_file())
    need, free = BYTES_PER_PARAMETER * trainable - held, shutil.disk_usage(out).free
    if free < need:
        raise DiskFull(f"--output_dir {out}: {free / 1e6:.2f} MB free, but the run's checkpoints need about "
                       f"{need / 1e6:.2f} MB (resume/, best/ and last/, each twice while it is replaced): free "
                       "space or choose another directory")


def save_trained(run: Run, name: str, info: dict) -> None:
    """Checkpoint `name` (best, last): the method's trained weights and method.json (with `info`)."""
    tmp = rundir.staging(run.out, name, run.rank)
    tensors, weights_name, json_files = methods.trained_files(run.engine.module, run.cfg.method, run.options,
                                                              {**run.meta, **info})  # a collective under ZeRO-3
    if run.rank == 0:
        with _unless_full(run, name, info["step"]):
            write_files(tmp, tensors, weights_name, json_files)
    rundir.swap_in(run.out, name, run.rank)


def save_resume(run: Run, progress: Progress) -> None:
    """resume/: the trained weights, the optimizer and schedule state, and `progress`."""
    tmp = rundir.staging(run.out, RESUME, run.rank)
    with _unless_full(run, RESUME, progress.step):
        resume.write(tmp, run.engine, methods.trainable(run.engine.module, run.cfg.method), progress.to_json(),
                     run.rank, run.world, rundir.identity(run.cfg, run.world))
    rundir.swap_in(run.out, RESUME, run.rank)


@contextlib.contextmanager
def _unless_full(run: Run, name: str, step: int):
    """A write that fills the disk leaves checkpoint `name` as it was and stops the run saying what is kept."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        if getattr(err, "errno", None) != errno.ENOSPC and "(os error 28)" not in str(err):
            raise
        rundir.discard_staging(run.out, name)  # frees what the failed write took
        raise DiskFull(f"{run.out}: no space left on the device writing {name}/ at step {step}; {name}/ is left as "
                       f"it was. {kept(run.out)} Free space, then {continue_with(run.out)}") from None


def load_resume(run: Run) -> Progress:
    """Loads resume/ into the engine; the metrics logged after its step are dropped, to be logged again."""
    saved = resume.read(run.out / RESUME, run.engine, methods.trainable(run.engine.module, run.cfg.method),
                        run.rank, run.world, rundir.identity(run.cfg, run.world))
    progress = Progress.from_json(saved)
    if run.rank == 0:
        truncate_metrics(run.out / METRICS, progress.step)
    return progress


def kept(out: Path) -> str:
    """What a stopped run leaves to use, as it is on disk."""
    names = [f"{out}/{name} (step {_step(out, name)})" for name in (BEST, RESUME) if (out / name).is_dir()]
    if names:
        return f"The last good checkpoints are kept in {' and '.join(names)}."
    return f"No evaluation finished before, so no checkpoint was kept; a new run may reuse {out}."


def continue_with(out: Path) -> str:
    """How to go on with the stopped run in `out`, as --resume true will do it."""
    if (out / RESUME).is_dir():
        return f"continue with --resume true (from {out}/{RESUME}, step {_step(out, RESUME)})"
    if (out / BEST).is_dir():
        return (f"run again with --resume true: with no {RESUME}/ saved it starts again from step 0 ({BEST}/ holds "
                "weights only, no optimizer state)")
    return "run again: it starts from step 0"


def _step(out: Path, name: str) -> int | str:
    """The step checkpoint `name` was saved at, as its own files record it."""
    try:
        meta = read_json(out / name / (resume.STATE if name == RESUME else METHOD))
        return meta["progress"]["step"] if name == RESUME else meta["step"]
    except (OSError, ValueError, KeyError):
        return "unknown"
