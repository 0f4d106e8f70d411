"""The learning-rate sweep of scripts/reproduce.py: per method family, a grid at the first seed that
grows past whichever edge has the lowest validation loss, so that the chosen LR lies inside it."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_report import ABLATIONS  # noqa: E402

FAMILIES = {"hycam": ("hycam", *ABLATIONS), "lora": ("lora",), "multilora": ("multilora",),
            "riemoe": ("riemoe",), "full": ("full",)}


def family(method: str) -> str:
    return next(name for name, members in FAMILIES.items() if method in members)


@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


class Sweep:
    """The sweep half of `reproduce.Study` (which gives `settings`, `status`, `run_dir` and `train`)."""

    def sweep_loss(self, run: Run) -> float | None:
        """Best validation loss of a run (None: not finished; inf: diverged)."""
        state = self.status(run)
        if state == "done":
            return json.loads((self.run_dir(run) / "summary.json").read_text())["best"]
        return math.inf if state == "diverged" else None

    def grid(self, name: str) -> list[float]:
        """The family's LRs: its listed grid, extended by one point past whichever edge has the lowest
        validation loss, once per finished round, at most `lr_extensions` times."""
        lrs, first = sorted(self.settings.lr_grid[name]), self.sweep_method(name)
        for _ in range(self.settings.lr_extensions if len(lrs) > 1 else 0):
            losses = [self.sweep_loss(Run(first, lr, self.settings.seeds[0])) for lr in lrs]
            if None in losses or min(losses) == math.inf:
                break
            best = losses.index(min(losses))
            if best == 0:
                lrs.insert(0, float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}"))
            elif best == len(lrs) - 1:
                lrs.append(float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}"))
            else:
                break
        return lrs

    def sweep_method(self, name: str) -> str:
        return next(m for m in FAMILIES[name] if m in self.settings.methods)

    def sweep_runs(self) -> dict[str, list[Run]]:
        """Per family present: its first listed method at each LR of its grid, at the first seed."""
        names = [n for n, members in FAMILIES.items() if any(m in self.settings.methods for m in members)]
        return {n: [Run(self.sweep_method(n), lr, self.settings.seeds[0]) for lr in self.grid(n)] for n in names}

    def sweep_losses(self) -> dict[str, dict[float, float | None]]:
        return {name: {run.lr: self.sweep_loss(run) for run in runs} for name, runs in self.sweep_runs().items()}

    def chosen_lrs(self) -> dict[str, float]:
        """The LR of the lowest validation loss per family whose grid is final (every point finished, the
        best inside it or no extension left) and not all diverged."""
        chosen = {}
        for name, losses in self.sweep_losses().items():
            if all(value is not None for value in losses.values()) and min(losses.values()) < math.inf:
                chosen[name] = min(losses, key=losses.get)
        return chosen

    def at_edge(self) -> dict[str, bool]:
        """Per family with a chosen LR: whether it is still at an edge of its (extended) grid."""
        grids = {name: [run.lr for run in runs] for name, runs in self.sweep_runs().items()}
        return {name: len(grids[name]) > 1 and lr in (grids[name][0], grids[name][-1])
                for name, lr in self.chosen_lrs().items()}

    def sweep(self) -> None:
        """Trains the sweep runs round by round: a finished round may extend a grid by a point."""
        while True:
            todo = [r for runs in self.sweep_runs().values() for r in runs if self.sweep_loss(r) is None]
            if not todo or not any([self.train(run) for run in todo]):
                return
