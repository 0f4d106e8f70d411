"""The paired part of the report: HyCAM against each method record by record, and knowledge retention on
general text.

Reads the study's eval/*/results.json (`records`: each test record's response NLL) and retention/*.json;
runs nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from hycam import files
from hycam.checkpoint import read_json
from hycam.evaluation.paired import RecordScores, paired_bootstrap, scores_from_results
from hycam.study.methods import NAMES
from hycam.study.runs import Run
from hycam.study.study import Study

PAPER_GAIN = 0.0365
"""The paper's average improvement of HyCAM over the best baseline (Table 2)."""
REPLICATES = 4000
"""paired_bootstrap's default: a p of 0 means none of them crossed 0."""


def by_method(study: Study, read: Callable[[Run], dict | None]) -> dict[str, list[dict]]:
    """method -> the records `read(run)` returns for each of its finished seeds (None: not there)."""
    found: dict[str, list[dict]] = {}
    for run in study.main_runs():
        record = read(run)
        if record is not None:
            found.setdefault(run.method, []).append(record)
    return found


def _json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def test_scores(study: Study) -> dict[str, RecordScores]:
    found = by_method(study, lambda run: _json(study.eval_dir(run) / files.RESULTS))
    return {m: scores_from_results(results) for m, results in found.items() if all("records" in r for r in results)}


def retention_scores(study: Study) -> tuple[dict[str, RecordScores], RecordScores | None]:
    found = by_method(study, lambda run: _json(study.retention_file(run)))
    base = _json(study.retention_file(None))
    return ({m: scores_from_results(results) for m, results in found.items()},
            scores_from_results([base]) if base else None)


def of_task(scores: RecordScores, task: str) -> RecordScores:
    keep = [i for i, t in enumerate(scores.tasks) if t == task]
    return RecordScores([scores.ids[i] for i in keep], [task] * len(keep), scores.tokens[keep], scores.nll[:, keep])


def ci_text(result: dict, percent: bool) -> str:
    """'estimate [low, high], p = ...' of a paired_bootstrap result."""
    fmt = (lambda v: f"{v:+.2%}") if percent else (lambda v: f"{v:+.4f}")
    p = result["p_value"]
    shown = f"p < {1 / REPLICATES:g}" if p == 0 else f"p = {p:.2g}"
    return f"{fmt(result['estimate'])} [{fmt(result['low'])}, {fmt(result['high'])}], {shown}"


def comparisons(study: Study) -> dict[str, dict]:
    """Per method other than HyCAM: HyCAM against it, PPL (relative) overall and per task, retention NLL."""
    scores, (kept, _) = test_scores(study), retention_scores(study)
    if "hycam" not in scores:
        return {}
    out = {}
    for method, other in scores.items():
        if method == "hycam" or other.ids != scores["hycam"].ids:
            continue
        out[method] = {"ppl": paired_bootstrap(scores["hycam"], other, "ppl"),
                       "tasks": {t: paired_bootstrap(of_task(scores["hycam"], t), of_task(other, t), "ppl")
                                 for t in dict.fromkeys(other.tasks)}}
        if "hycam" in kept and method in kept:
            out[method]["retention"] = paired_bootstrap(kept["hycam"], kept[method], "nll")
    return out


def forgetting(study: Study) -> dict[str, dict]:
    """Per method: its general-text NLL minus the base model's, paired over passages (and its seeds)."""
    kept, base = retention_scores(study)
    return {} if base is None else {m: paired_bootstrap(s, base, "nll") for m, s in kept.items()}


def retention_cells(study: Study) -> dict[str, str]:
    """Table name -> 'ΔNLL [CI]' cell of the retention column."""
    return {NAMES[m]: f"{r['estimate']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]" for m, r in forgetting(study).items()}


def with_column(markdown: str, header: str, cells: dict[str, str]) -> str:
    """A markdown table (rows starting '| Method name |') with one more column; '-' where a row has no cell."""
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        name = line.split("|")[1].strip()
        extra = header if name == "Method" else "---" if set(name) <= {"-", " "} else cells.get(name, "-")
        lines[i] = line + f" {extra} |"
    return "\n".join(lines)


def paired_section(study: Study) -> str:
    """The paired comparisons, the detectable difference, and the retention of every method."""
    found = comparisons(study)
    text = ["## Paired comparison (the same test records for every method and seed)", ""]
    if not found:
        return "\n".join(text + ["Needs HyCAM and another method evaluated with per-record NLL."])
    return "\n".join(text + _comparison_table(study, found) + _retention_table(study, found))


def _comparison_table(study: Study, found: dict[str, dict]) -> list[str]:
    tasks = list(next(iter(found.values()))["tasks"])
    text = ["HyCAM's averaged PPL relative to each method's (negative: HyCAM lower), 95% bootstrap CI over "
            "test records (stratified by task) and seeds, two-sided bootstrap p; the detectable difference is "
            "1.96 x the bootstrap SE (p < 0.05), and 2.80 x SE for 80% power.", "",
            "| HyCAM vs | averaged PPL | detectable (p<0.05) | detectable (80% power) | "
            + " | ".join(tasks) + " |", "| --- " * (4 + len(tasks)) + "|"]
    for method, result in found.items():
        ppl = result["ppl"]
        text.append(f"| {NAMES[method]} | {ci_text(ppl, True)} | {ppl['detectable']:.2%} | "
                    f"{ppl['detectable_80']:.2%} | " + " | ".join(
                        f"{result['tasks'][t]['estimate']:+.2%} ± {result['tasks'][t]['detectable']:.1%}"
                        for t in tasks) + " |")
    detectable = statistics.median(r["ppl"]["detectable"] for r in found.values())
    records = next(iter(found.values()))["ppl"]["records"]
    return text + ["", f"Per task: estimate ± detectable difference. {records} test records in all. The smallest "
                   f"relative difference of averaged PPL this design detects at p < 0.05 is about {detectable:.2%} "
                   f"(median over the comparisons); the paper's claimed average gain is {PAPER_GAIN:.2%}. Every run "
                   f"trains on one split (data seed {study.settings.data_seed}): the split's own variance is not in "
                   "these intervals."]


def _retention_table(study: Study, found: dict[str, dict]) -> list[str]:
    text = ["", "### Knowledge retention (general English text outside the tasks)", "",
            "Change of the token-level NLL (nats/token) on the Wikipedia passages after training, against the "
            "base model (positive: forgetting), paired over passages, 95% CI over passages and seeds; and "
            "HyCAM's change minus each method's.", "", "| Method | ΔNLL vs base | HyCAM minus it |",
            "| --- | --- | --- |"]
    for method, result in forgetting(study).items():
        other = found.get(method, {}).get("retention")
        text.append(f"| {NAMES[method]} | {ci_text(result, False)} | {ci_text(other, False) if other else '-'} |")
    return text
