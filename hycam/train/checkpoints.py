"""The run's checkpoints: best/ and last/ (trained weights to evaluate), resume/ (to continue).

Each is written into rundir's staging folder and swapped in whole (`rundir.staging` / `swap_in`): the
swap is what keeps a checkpoint folder complete, so the files are written into the staging folder
plainly.
"""

from __future__ import annotations

from pathlib import Path

from hycam.baselines import methods
from hycam.checkpoint import write_files
from hycam.files import BEST, METRICS, RESUME
from hycam.train import resume, rundir
from hycam.train.metrics import truncate_metrics
from hycam.train.state import Progress, Run


def save_trained(run: Run, name: str, info: dict) -> None:
    """Checkpoint `name` (best, last): the method's trained weights and method.json (with `info`)."""
    tmp = rundir.staging(run.out, name, run.rank)
    tensors, weights_name, json_files = methods.trained_files(run.engine.module, run.cfg.method, run.options,
                                                              {**run.meta, **info})  # a collective under ZeRO-3
    if run.rank == 0:
        write_files(tmp, tensors, weights_name, json_files)
    rundir.swap_in(run.out, name, run.rank)


def save_resume(run: Run, progress: Progress) -> None:
    """resume/: the trained weights, the optimizer and schedule state, and `progress`."""
    tmp = rundir.staging(run.out, RESUME, run.rank)
    resume.write(tmp, run.engine, methods.trainable(run.engine.module, run.cfg.method), progress.to_json(),
                 run.rank, run.world)
    rundir.swap_in(run.out, RESUME, run.rank)


def load_resume(run: Run) -> Progress:
    """Loads resume/ into the engine; the metrics logged after its step are dropped, to be logged again."""
    saved = resume.read(run.out / RESUME, run.engine, methods.trainable(run.engine.module, run.cfg.method),
                        run.rank, run.world)
    progress = Progress.from_json(saved)
    if run.rank == 0:
        truncate_metrics(run.out / METRICS, progress.step)
    return progress


def kept(out: Path) -> str:
    """What a stopped run leaves to use, as it is on disk."""
    names = [f"{out}/{name}" for name in (BEST, RESUME) if (out / name).is_dir()]
    if names:
        return f"The last good checkpoints are kept in {' and '.join(names)}."
    return f"No evaluation finished before, so no checkpoint was kept; a new run may reuse {out}."
