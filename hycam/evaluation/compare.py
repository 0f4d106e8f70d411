"""Compare methods over seeds: collect (or compute) each run's evaluation, write the paper's tables.

    python -m hycam.evaluation.compare runs/*/ --out comparison [--baselines lora multilora] [--tasks DATA ...]

Each path is a result JSON (`results.json` of `hycam-eval`), a folder holding one, a checkpoint
dir (`method.json`) or a run dir (its `best` checkpoint, or its only one). A checkpoint without
`eval-SPLIT/results.json` is evaluated first by `hycam-eval`, with the evaluation options given
here (by default on the run's own task files). The tables (`hycam.evaluation.tables`) show mean ± std over
seeds, the best in bold and * where Welch's two-sided t-test of the best method against the best
baseline gives p < 0.05. Default baselines: the paper's (`hycam.baselines.methods.BASELINES`) among the
results; with none of them, every other method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hycam.evaluation import evaluate, tables
from hycam.baselines.methods import BASELINES, METHOD_FILE


class CompareError(Exception):
    """A path that holds no result and no checkpoint, or an evaluation that failed: exit code 2."""


def checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint in `path`: itself, else its `best` (early stopping's pick, as in the paper),
    else its only subfolder with a method.json."""
    if (path / METHOD_FILE).is_file():
        return path
    if (path / "best" / METHOD_FILE).is_file():
        return path / "best"
    found = sorted(sub for sub in path.iterdir() if (sub / METHOD_FILE).is_file()) if path.is_dir() else []
    if len(found) > 1:
        raise CompareError(f"{path} holds several checkpoints ({', '.join(p.name for p in found)}); name one")
    return found[0] if found else None


def result_file(path: str | Path, split: str, eval_args: list[str]) -> Path:
    """The result JSON behind `path`, evaluating its checkpoint first when it has none."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "results.json").is_file():
        return path / "results.json"
    checkpoint = checkpoint_dir(path) if path.is_dir() else None
    if checkpoint is None:
        raise CompareError(f"{path}: neither a result JSON nor a folder with results.json or a checkpoint")
    result = checkpoint / f"eval-{split}" / "results.json"
    if not result.is_file():
        print(f"evaluating {checkpoint} ...", file=sys.stderr)
        if evaluate.main(["--checkpoint", str(checkpoint), "--split", split, *eval_args]) != 0:
            raise CompareError(f"{checkpoint}: evaluation failed (see the error above)")
    return result


def default_baselines(results: list[dict]) -> list[str] | None:
    present = [m for m in dict.fromkeys(r["method"] for r in results) if m in BASELINES]
    return present or None


def compare(paths: list[str], output_dir: str | Path, baselines: list[str] | None = None, split: str = "test",
            eval_args: list[str] | None = None) -> str:
    """Writes comparison.md and comparison.json (the `tables.summarize` numbers); returns the tables."""
    files = [result_file(p, split, eval_args or []) for p in paths]
    try:
        results = tables.load_results(files)
        baselines = baselines or default_baselines(results)
        summary = tables.summarize(results, baselines)
        markdown = (f"## Averaged over tasks\n\n{tables.markdown_overall(results, baselines)}\n"
                    f"## Per task\n\n{tables.markdown_per_task(results, baselines)}")
    except ValueError as err:
        raise CompareError(str(err)) from err
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [{"method": r["method"], "seed": r["seed"], "file": str(f.resolve())} for r, f in zip(results, files)]
    (out / "comparison.json").write_text(json.dumps({"baselines": baselines, "runs": runs, **summary}, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hycam.evaluation.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="result JSONs, eval folders, checkpoint or run dirs")
    parser.add_argument("--out", required=True, help="folder for comparison.md and comparison.json")
    parser.add_argument("--baselines", nargs="+", default=None, help="methods the best one is tested against")
    parser.add_argument("--split", choices=evaluate.SPLITS, default="test")
    forwarded = ("tasks", "base_model", "device", "limit", "max_length", "max_new_tokens", "batch_size")
    parser.add_argument("--tasks", nargs="+", default=None, help="task files, to evaluate checkpoints without results")
    for name in forwarded[1:]:
        parser.add_argument("--" + name.replace("_", "-"), default=None, help="passed on to hycam-eval")
    args = parser.parse_args(argv)
    eval_args: list[str] = []
    for name in forwarded:
        value = getattr(args, name)
        if value is not None:
            eval_args += ["--" + name.replace("_", "-"), *(value if isinstance(value, list) else [value])]
    try:
        print(compare(args.paths, args.out, args.baselines, args.split, eval_args))
    except CompareError as err:
        print(f"hycam.evaluation.compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
