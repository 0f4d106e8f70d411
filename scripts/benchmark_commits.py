"""scripts/benchmark.py's ratios for two commits, run in turn: A, B, A, B, ... on the same machine.

    python scripts/benchmark_commits.py OLD_COMMIT [NEW_COMMIT] --rounds 2 -- --sweep-repeats 0 --compile

Each commit is checked out in a temporary git worktree and benchmarked by its own scripts/benchmark.py
with its own hycam on the path (NEW defaults to the working tree); alternating the runs spreads the
machine's drift over both. Prints one table: every ratio of every run, then each commit's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="a commit (the baseline)")
    p.add_argument("new", nargs="?", default=None, help="a commit; default: the working tree")
    p.add_argument("--rounds", type=int, default=2, help="benchmark runs of each commit, alternating")
    p.add_argument("--out", default="benchmark_out/commits", help="folder for each run's output and the table")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.benchmark_args = argv[cut + 1 :]  # after --: passed to scripts/benchmark.py
    return args


def benchmark(tree: Path, out: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(tree / "scripts" / "benchmark.py"), *args, "--out", str(out)]
    subprocess.run(command, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "benchmark.json").read_text())["ratios"]


def table(labels: tuple[str, str], runs: list[tuple[str, dict[str, float]]]) -> str:
    names = list(dict.fromkeys(name for _, ratios in runs for name in ratios))
    header = [*(f"{label} {i // len(labels) + 1}" for i, (label, _) in enumerate(runs)), *(f"{x} median" for x in labels)]
    lines = ["| ratio | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name in names:
        cells = [f"{ratios[name]:.3f}" if name in ratios else "" for _, ratios in runs]
        for label in labels:
            values = [ratios[name] for run_label, ratios in runs if run_label == label and name in ratios]
            cells.append(f"{statistics.median(values):.3f}" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra = args.benchmark_args
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {}
        for label, commit in (("old", args.old), ("new", args.new)):
            if commit is None:
                trees[label] = REPO
                continue
            trees[label] = Path(scratch) / label
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(trees[label]), commit],
                           check=True)
        try:
            runs = [(label, benchmark(trees[label], out / f"{label}-{i}", extra))
                    for i in range(args.rounds) for label in ("old", "new")]
        finally:
            for label, tree in trees.items():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    text = f"old: {args.old}, new: {args.new or 'working tree'}; scripts/benchmark.py {' '.join(extra)}\n\n"
    text += table(("old", "new"), runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commits.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
