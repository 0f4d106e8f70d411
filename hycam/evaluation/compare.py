"""Compare methods over seeds: collect (or compute) each run's evaluation, write the paper's tables.

    python -m hycam.evaluation.compare runs/*/ --out comparison [--baselines lora multilora] [--tasks DATA ...]

Each path is a result JSON (`results.json` of `hycam-eval`), a folder holding one, a checkpoint
dir (`method.json`) or a run dir (its `best` checkpoint, or its only one). A checkpoint without
`eval-SPLIT/results.json` is evaluated first, as `hycam-eval` does it, with the evaluation options given
here (by default on the run's own task files). The tables (`hycam.evaluation.tables`) show mean ± std over
seeds, the best in bold and * where Welch's two-sided t-test of the best method against the best
baseline gives p < 0.05. Default baselines: the paper's (`hycam.baselines.methods.BASELINES`) among the
results; with none of them, every other method.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from hycam import files
from hycam.baselines.methods import BASELINES
from hycam.data import DataError
from hycam.evaluation import evaluate, tables
from hycam.evaluation.selection import SPLITS, EvalOptions, UsageError

COMPARISON_MD, COMPARISON_JSON = "comparison.md", "comparison.json"
FORWARDED = ("limit", "max_length", "max_new_tokens", "batch_size")
"""The EvalOptions a comparison takes as flags (with --tasks, --base-model and --device) for the evaluations it runs."""


@dataclass(frozen=True)
class Evaluation:
    """How a comparison evaluates a checkpoint that has no results yet: as hycam-eval would."""

    tasks: list[str] | None = None
    """Task files to score; None: the run's own."""
    base_model: str | None = None
    """The base model; None: the run's."""
    device: str = "cpu"
    """Where the model runs."""
    options: EvalOptions = field(default_factory=EvalOptions)
    """Records and decoding; the comparison's split replaces its split."""


class CompareError(Exception):
    """A path that holds no result and no checkpoint, or an evaluation that failed: exit code 2."""


def checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint in `path`: itself, else its `best` (early stopping's pick, as in the paper),
    else its only subfolder with a method.json."""
    if (path / files.METHOD).is_file():
        return path
    if (path / files.BEST / files.METHOD).is_file():
        return path / files.BEST
    found = sorted(sub for sub in path.iterdir() if (sub / files.METHOD).is_file()) if path.is_dir() else []
    if len(found) > 1:
        raise CompareError(f"{path} holds several checkpoints ({', '.join(p.name for p in found)}); name one")
    return found[0] if found else None


def result_file(path: str | Path, split: str, evaluation: Evaluation) -> Path:
    """The result JSON behind `path`, evaluating its checkpoint first when it has none."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / files.RESULTS).is_file():
        return path / files.RESULTS
    checkpoint = checkpoint_dir(path) if path.is_dir() else None
    if checkpoint is None:
        raise CompareError(f"{path}: neither a result JSON nor a folder with results.json or a checkpoint")
    out = evaluate.default_output_dir(checkpoint, split)
    if not (out / files.RESULTS).is_file():
        print(f"evaluating {checkpoint} ...", file=sys.stderr)
        evaluate_into(out, checkpoint, split, evaluation)
    return out / files.RESULTS


def evaluate_into(out: Path, checkpoint: Path, split: str, evaluation: Evaluation) -> None:
    """hycam-eval of `checkpoint` on `split`, written to `out` and reported as hycam-eval reports it."""
    try:
        result, generations = evaluate.run(str(checkpoint), evaluation.base_model, evaluation.tasks,
                                           replace(evaluation.options, split=split), evaluation.device)
    except (UsageError, DataError) as err:
        print(f"hycam-eval: error: {err}", file=sys.stderr)
        raise CompareError(f"{checkpoint}: evaluation failed (see the error above)") from err
    evaluate.report(result, generations, out)


def default_baselines(results: list[dict]) -> list[str] | None:
    present = [m for m in dict.fromkeys(r["method"] for r in results) if m in BASELINES]
    return present or None


def compare(paths: list[str], output_dir: str | Path, baselines: list[str] | None = None, split: str = "test",
            evaluation: Evaluation = Evaluation()) -> str:
    """Writes comparison.md and comparison.json (the `tables.summarize` numbers); returns the tables."""
    found = [result_file(p, split, evaluation) for p in paths]
    try:
        results = tables.load_results(found)
        baselines = baselines or default_baselines(results)
        summary = tables.summarize(results, baselines)
        markdown = (f"## Averaged over tasks\n\n{tables.markdown_overall(results, baselines)}\n"
                    f"## Per task\n\n{tables.markdown_per_task(results, baselines)}")
    except ValueError as err:
        raise CompareError(str(err)) from err
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [{"method": r["method"], "seed": r["seed"], "file": str(f.resolve())} for r, f in zip(results, found)]
    (out / COMPARISON_JSON).write_text(json.dumps({"baselines": baselines, "runs": runs, **summary}, indent=2) + "\n")
    (out / COMPARISON_MD).write_text(markdown)
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hycam.evaluation.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="result JSONs, eval folders, checkpoint or run dirs")
    parser.add_argument("--out", required=True, help="folder for comparison.md and comparison.json")
    parser.add_argument("--baselines", nargs="+", default=None, help="methods the best one is tested against")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--tasks", nargs="+", default=None, help="task files, to evaluate checkpoints without results")
    parser.add_argument("--base-model", default=None, help="passed on to hycam-eval")
    parser.add_argument("--device", default="cpu", help="passed on to hycam-eval")
    for name in FORWARDED:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="passed on to hycam-eval")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {name: getattr(args, name) for name in FORWARDED if getattr(args, name) is not None}
    evaluation = Evaluation(args.tasks, args.base_model, args.device, EvalOptions(**given))
    try:
        print(compare(args.paths, args.out, args.baselines, args.split, evaluation))
    except CompareError as err:
        print(f"hycam.evaluation.compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
