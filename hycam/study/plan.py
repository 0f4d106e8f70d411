"""The time plan of the study: what each unit costs on the idle 2-core machine, and what is left.

The constants are unit times measured on that machine (docs/RESULTS.md's first study, fp32,
OMP_NUM_THREADS=2); `plan` adds them up over the units not done yet.
"""

from __future__ import annotations

import math

from hycam import files
from hycam.study import layout
from hycam.study.methods import family
from hycam.study.runs import Run
from hycam.study.study import Study

STEP_SECONDS = {"full": 3.2, "multilora": 4.5, "riemoe": 8.0}
"""Seconds per optimizer step of 2 x 256 token slots on the idle 2-core machine (other methods: 2.7),
measured with OMP_NUM_THREADS=2 (HyCAM, RieMoE) or scaled from 1-thread timings (the others)."""
START_SECONDS = 10.0
"""Process start: imports, the de-quantised model and tokenizer, tokenising the records."""
FORWARD_SECONDS, PREFILL_SECONDS, DECODE_SECONDS = 0.4, 5.0, 0.12
"""A no-grad forward of one record of <= 256 tokens; a generation batch's prompt pass; one decoding step
of a batch (an idle hycam.evaluation.evaluate of 20 records x 48 new tokens took 53 s)."""
DENSE_EXPERTS = 1.7
"""RieMoE-LoRA's dense experts make its forwards this much slower."""
REPORT_SECONDS = 30.0
"""The loss figures and the report."""


def estimate(study: Study, run: Run | None, kind: str) -> float:
    """Seconds a unit takes on an idle machine: kind 'train', 'eval', 'retention' or 'experts'."""
    s = study.settings
    slow = DENSE_EXPERTS if run is not None and run.method == "riemoe" else 1.0
    if kind == "eval":
        batches = math.ceil(5 * s.generate_records / s.eval_batch_size)
        work = 5 * s.test_records * FORWARD_SECONDS + batches * (PREFILL_SECONDS + s.max_new_tokens * DECODE_SECONDS)
        return START_SECONDS + work * slow
    if kind == "retention":
        return START_SECONDS + s.retention_passages * FORWARD_SECONDS * s.retention_tokens / 256 * slow
    if kind == "experts":
        return START_SECONDS + 5 * s.generate_records * FORWARD_SECONDS
    slots = s.micro_batch_size * s.grad_accum * s.max_length / 512
    validations = math.ceil(s.steps / s.eval_interval)
    return (START_SECONDS + s.steps * slots * STEP_SECONDS.get(run.method, 2.7)
            + validations * 5 * s.val_records * FORWARD_SECONDS * slow)


def plan(study: Study) -> str:
    """Each unit with its state, and the time left; until a family's sweep ends, its LR is unknown ('lr?')."""
    lines: list[str] = []
    chosen = study.chosen_lrs()
    left = _sweep_plan(study, chosen, lines)
    base = study.retention_file(None).is_file()
    lines.append(f"retention base model {'done' if base else 'todo'}")
    left += 0 if base else estimate(study, None, "retention")
    left += sum(_run_plan(study, chosen, method, seed, lines) for seed in study.settings.seeds
                for method in study.settings.methods)
    figures = (study.root / layout.FIGURES / f"{layout.EXPERTS}.json").is_file()
    left += (0 if figures else estimate(study, None, "experts")) + REPORT_SECONDS
    lines.append(f"estimated time left on an idle 2-core machine: {left / 60:.0f} min "
                 "(without grid extensions not yet known)")
    return "\n".join(lines)


def _sweep_plan(study: Study, chosen: dict[str, float], lines: list[str]) -> float:
    """Appends the sweep runs' states to `lines`; returns their seconds left."""
    left = 0.0
    for name, runs in study.sweep_runs().items():
        for run in runs:
            state = study.status(run)
            lines.append(f"sweep {run.name:32} {state}")
            left += 0 if state == "done" else estimate(study, run, "train")
        if name not in chosen and study.settings.lr_extensions:
            lines.append(f"sweep {name}: each extension of the grid adds one run "
                         f"(~{estimate(study, runs[0], 'train') / 60:.0f} min), at most {study.settings.lr_extensions}")
    return left


def _run_plan(study: Study, chosen: dict[str, float], method: str, seed: int, lines: list[str]) -> float:
    """Appends one main run's training, evaluation and retention states to `lines`; returns their seconds left."""
    lr = chosen.get(family(method))
    run = Run(method, math.nan if lr is None else lr, seed)
    shared = lr is None and seed == study.settings.seeds[0] and method == study.sweep_method(family(method))
    state = study.status(run) if lr else "= its chosen sweep run" if shared else "after the sweep"
    evaluated = (study.eval_dir(run) / files.RESULTS).is_file()
    kept = lr is not None and study.retention_file(run).is_file()
    lines.append(f"train {run.name if lr else f'{method}_lr?_s{seed}':32} {state}; "
                 f"eval {'done' if evaluated else 'todo'}; retention {'done' if kept else 'todo'}")
    left = 0 if shared or state == "done" else estimate(study, run, "train")
    left += 0 if evaluated else estimate(study, run, "eval")
    return left + (0 if kept else estimate(study, run, "retention"))


def planned_minutes(study: Study) -> float:
    """The whole study's estimate from scratch, with the grids as they stand (extensions made so far)."""
    s = study.settings
    sweep = [run for runs in study.sweep_runs().values() for run in runs]
    later = [Run(m, 0.0, seed) for seed in s.seeds[1:] for m in s.methods]
    later += [Run(m, 0.0, s.seeds[0]) for m in s.methods if m not in {run.method for run in sweep}]
    evaluated = [Run(m, 0.0, seed) for seed in s.seeds for m in s.methods]
    seconds = sum(estimate(study, run, "train") for run in sweep + later)
    seconds += sum(estimate(study, run, "eval") + estimate(study, run, "retention") for run in evaluated)
    return (seconds + estimate(study, None, "retention") + estimate(study, None, "experts") + REPORT_SECONDS) / 60
