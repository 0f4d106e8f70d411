"""Whether training had flattened: every finished run's validation loss at each evaluation, from its
metrics.jsonl."""

from __future__ import annotations

import json

from hycam import files
from hycam.study.study import Study


def flattening(study: Study) -> dict[str, list[tuple[int, float]]]:
    """Run name -> (step, validation loss) of every finished main run."""
    curves = {}
    for run in study.main_runs():
        file = study.run_dir(run) / files.METRICS
        if study.status(run) == "done":
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            curves[run.name] = [(r["step"], r["loss"]) for r in rows if r["split"] == "validation"]
    return curves


def last_drop_ratio(values: list[float]) -> float:
    """The last interval's drop as a share of the first's (nan with fewer than three points or no first drop)."""
    if len(values) > 2 and values[0] != values[1]:
        return (values[-2] - values[-1]) / (values[0] - values[1])
    return float("nan")


def flattening_section(study: Study) -> str:
    """The validation loss at every evaluation, and the last interval's drop as a share of the first's."""
    curves = flattening(study)
    if not curves:
        return ""
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    lines = ["## Validation loss during training", "", "| run | " + " | ".join(f"step {s}" for s in steps)
             + " | last drop / first drop |", "| --- " * (len(steps) + 2) + "|"]
    for name, curve in curves.items():
        losses = dict(curve)
        ratio = last_drop_ratio([losses[s] for s in steps if s in losses])
        lines.append(f"| {name} | " + " | ".join(f"{losses[s]:.4f}" if s in losses else "-" for s in steps)
                     + f" | {ratio:.2f} |")
    lines += ["", "A ratio near 0 means the loss has flattened by the end (a negative one: it rose again)."]
    return "\n".join(lines)
