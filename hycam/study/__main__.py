"""A paired study of HyCAM and the paper's baselines on SmolLM2-135M-Instruct on this 2-core CPU, resumable.

    python -m hycam.study           # the study (~2.5 h on the idle machine: --plan prints the estimate)
    python -m hycam.study --quick   # smoke check of every unit (<10 min idle), 2 steps, 1 seed
    python -m hycam.study --plan    # what is done, what is left, an estimate; runs nothing

Paired design: every method and seed trains on the same split and the same data order (main.py
--data_seed), so all evaluations score the same test records and seeds vary only the adapter
initialisation and the routing noise; methods are compared record by record (hycam.evaluation.paired).
Each method family's LR is the lowest validation loss of a grid at the first seed, extended by one
point at whichever edge wins (up to `lr_extensions` times), so that the chosen LR is inside the grid;
that sweep run is also the family's first-seed run. Each run is scored on the test split (PPL, BLEU-4,
ROUGE-L) and on general English text outside the tasks (knowledge retention, hycam.evaluation.retention).

Every unit (a training run, an evaluation, a retention score, a figure) lands atomically in --study_dir,
so a rerun skips finished units and continues an interrupted `main.py` run from its resume/ state. Units
run one at a time as subprocesses with OMP_NUM_THREADS=2. The study runs from one commit: it records
`git rev-parse HEAD` and refuses a dirty tree or another commit than it started from (--allow_dirty).
Start it from a worktree of a fixed commit (`git worktree add ../study HEAD`) and run it from that
worktree's root, so that edits made meanwhile do not change it midway. The report (docs/RESULTS.md,
figures in docs/figures/; written by hycam/study/report.py) is rewritten below its marker line; a smoke
run never replaces a study's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hycam.study.checkout import check_commit
from hycam.study.layout import REPO
from hycam.study.plan import plan
from hycam.study.report import publish
from hycam.study.settings import QUICK, Settings
from hycam.study.study import Study


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m hycam.study", description=__doc__.split("\n\n")[0],
                                    epilog=__doc__.split("\n\n", 1)[1],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parse.add_argument("--quick", action="store_true", help="smoke check: all 9 methods, 2 steps, 1 seed, "
                       "a 2-LR sweep (+1 extension) for HyCAM only, 200 records per task, 3 test records per task")
    parse.add_argument("--allow_dirty", action="store_true", help="run from a checkout with uncommitted "
                       "changes, or at another commit than the study started from (recorded in the report)")
    parse.add_argument("--plan", action="store_true", help="print the units, their state and the time left")
    parse.add_argument("--report_only", action="store_true", help="rewrite the report from the finished units")
    parse.add_argument("--study_dir", type=Path, default=None,
                       help="default: runs/study (runs/study-quick with --quick)")
    parse.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md",
                       help="the report (figures beside it)")
    parse.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each unit; on a machine "
                       "that other jobs share, 1 avoids OpenMP threads spinning against them (much slower)")
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = QUICK if args.quick else Settings()
    study = Study(args.study_dir or REPO / "runs" / ("study-quick" if args.quick else "study"), settings,
                  threads=args.threads)
    if args.plan:
        print(plan(study))
        return 0
    if args.report_only:
        study.check_settings()  # a report under other settings than the study's would mislabel it
    else:
        check_commit(study.root, args.allow_dirty, args.quick)
        study.run_all()
    publish(study, args.results)
    if study.failures:
        print("[reproduce] failed units (rerun to retry them):\n  " + "\n  ".join(study.failures), file=sys.stderr)
    return 1 if study.failures else 0


if __name__ == "__main__":
    sys.exit(main())
