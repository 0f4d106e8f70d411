"""Training and validation loss of several runs, by method, with their spread across seeds, as a PNG.

Read from the run dirs `main.py` writes (run_config.json names the method and seed, metrics.jsonl
holds the logged losses); seeds are aligned by optimizer step.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hycam import files
from hycam.checkpoint import read_json
from hycam.evaluation.plots import save_figure

BANDS = ("minmax", "std")
"""The validation band across seeds: min to max, or mean ± std."""
Curves = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
"""method -> split -> (steps, loss[seed, step])."""


def read_run(run_dir: str | Path) -> tuple[str, int, list[dict]]:
    """(method, seed, metrics.jsonl rows) of a run dir written by main.py."""
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / files.RUN_CONFIG, run_dir / files.METRICS
    for file in (config_file, metrics_file):
        if not file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run dir: {file.name} is missing")
    config = read_json(config_file)
    rows = []
    for number, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{metrics_file}, line {number}: malformed JSON ({err.msg})") from err
    return config["method"], int(config["seed"]), rows


def loss_curves(run_dirs: Sequence[str | Path]) -> Curves:
    """method -> split -> (steps, loss[seed, step]), NaN where a seed logged nothing at a step
    (a run stopped early); the last row of a (seed, split, step) counts."""
    logged: dict[str, dict[str, dict[int, dict[int, float]]]] = defaultdict(lambda: defaultdict(dict))
    for run_dir in run_dirs:
        method, seed, rows = read_run(run_dir)
        for row in rows:
            if row.get("split") in ("train", "validation") and "loss" in row:
                logged[method][row["split"]].setdefault(seed, {})[int(row["step"])] = float(row["loss"])
    curves: Curves = {}
    for method, splits in logged.items():
        curves[method] = {}
        for split, by_seed in splits.items():
            steps = np.array(sorted(set().union(*by_seed.values())))
            values = np.array([[losses.get(s, np.nan) for s in steps] for losses in by_seed.values()])
            curves[method][split] = (steps, values)  # (steps,), (seeds, steps)
    return curves


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the last `window` points (fewer at the start), NaNs skipped."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        if np.isfinite(part).any():
            out[i] = np.nanmean(part)
    return out


def plot_loss_curves(run_dirs: Sequence[str | Path], path: str | Path, band: str = "minmax") -> Path:
    """`loss_figure` of the runs as a PNG file."""
    return save_figure(loss_figure(loss_curves(run_dirs), band), path)


def loss_figure(curves: Curves, band: str = "minmax") -> Figure:
    """Training loss per method (mean over seeds; raw faint, a moving average over a sixth of the run
    bold) beside validation loss (mean with markers, and a min-max or ±std band across seeds)."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    train, validation = fig.subplots(1, 2)
    for method, splits in curves.items():
        if "train" in splits:
            _draw_training(train, method, *splits["train"])
        if "validation" in splits:
            _draw_validation(validation, method, *splits["validation"], band)
    train.set(title="training loss (moving average; raw faint)")
    validation.set(title="validation loss")
    for ax in (train, validation):
        ax.set(xlabel="optimizer step", ylabel="loss (nats/token)")
        ax.legend(fontsize="small")
    return fig


def _draw_training(ax: Axes, method: str, steps: np.ndarray, values: np.ndarray) -> None:
    mean = np.nanmean(values, axis=0)
    line, = ax.plot(steps, smooth(mean, max(1, len(steps) // 6)), label=f"{method} ({values.shape[0]} seeds)",
                    linewidth=1.8)
    ax.plot(steps, mean, color=line.get_color(), alpha=0.2, linewidth=0.8)


def _draw_validation(ax: Axes, method: str, steps: np.ndarray, values: np.ndarray, band: str) -> None:
    mean = np.nanmean(values, axis=0)
    low, high = ((np.nanmin(values, axis=0), np.nanmax(values, axis=0)) if band == "minmax"
                 else (mean - np.nanstd(values, axis=0), mean + np.nanstd(values, axis=0)))
    line, = ax.plot(steps, mean, marker="o", markersize=4, label=f"{method} ({values.shape[0]} seeds)")
    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
