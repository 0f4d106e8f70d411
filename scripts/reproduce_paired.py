"""The paired part of the report of scripts/reproduce.py: HyCAM against each method record by record,
knowledge retention on general text, and whether the validation loss flattened.

Reads the study's eval/*/results.json (`records`: each test record's response NLL), retention/*.json
and runs/*/metrics.jsonl; runs nothing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hycam.evaluation.paired import RecordScores, paired_bootstrap, scores_from_results

if TYPE_CHECKING:
    from reproduce import Study

PAPER_GAIN = 0.0365
"""The paper's average improvement of HyCAM over the best baseline (Table 2)."""


def by_method(study: Study, read) -> dict[str, list[dict]]:
    """method -> the records `read(run)` returns for each of its finished seeds (None: not there)."""
    found: dict[str, list[dict]] = {}
    for run in study.main_runs():
        record = read(run)
        if record is not None:
            found.setdefault(run.method, []).append(record)
    return found


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def test_scores(study: Study) -> dict[str, RecordScores]:
    found = by_method(study, lambda run: _json(study.eval_dir(run) / "results.json"))
    return {m: scores_from_results(results) for m, results in found.items() if all("records" in r for r in results)}


def retention_scores(study: Study) -> tuple[dict[str, RecordScores], RecordScores | None]:
    found = by_method(study, lambda run: _json(study.retention_file(run)))
    base = _json(study.retention_file(None))
    return ({m: scores_from_results(results) for m, results in found.items()},
            scores_from_results([base]) if base else None)


def of_task(scores: RecordScores, task: str) -> RecordScores:
    keep = [i for i, t in enumerate(scores.tasks) if t == task]
    return RecordScores([scores.ids[i] for i in keep], [task] * len(keep), scores.tokens[keep], scores.nll[:, keep])


def _ci(result: dict, percent: bool) -> str:
    fmt = (lambda v: f"{v:+.2%}") if percent else (lambda v: f"{v:+.4f}")
    p = result["p_value"]
    shown = f"p < {1 / 4000:g}" if p == 0 else f"p = {p:.2g}"  # 4000 replicates: none crossed 0
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


def retention_cells(study: Study, names: dict[str, str]) -> dict[str, str]:
    """Table name -> 'ΔNLL [CI]' cell of the retention column."""
    return {names[m]: f"{r['estimate']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]" for m, r in forgetting(study).items()}


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


def paired_section(study: Study, names: dict[str, str]) -> str:
    """The paired comparisons, the detectable difference, and the retention of every method."""
    found, lost = comparisons(study), forgetting(study)
    text = ["## Paired comparison (the same test records for every method and seed)", ""]
    if not found:
        return "\n".join(text + ["Needs HyCAM and another method evaluated with per-record NLL."])
    tasks = list(next(iter(found.values()))["tasks"])
    text += ["HyCAM's averaged PPL relative to each method's (negative: HyCAM lower), 95% bootstrap CI over "
             "test records (stratified by task) and seeds, two-sided bootstrap p; the detectable difference is "
             "1.96 x the bootstrap SE (p < 0.05), and 2.80 x SE for 80% power.", "",
             "| HyCAM vs | averaged PPL | detectable (p<0.05) | detectable (80% power) | "
             + " | ".join(tasks) + " |", "| --- " * (4 + len(tasks)) + "|"]
    for method, result in found.items():
        ppl = result["ppl"]
        text.append(f"| {names[method]} | {_ci(ppl, True)} | {ppl['detectable']:.2%} | {ppl['detectable_80']:.2%} | "
                    + " | ".join(f"{result['tasks'][t]['estimate']:+.2%} ± {result['tasks'][t]['detectable']:.1%}"
                                 for t in tasks) + " |")
    detectable = statistics.median(r["ppl"]["detectable"] for r in found.values())
    records = next(iter(found.values()))["ppl"]["records"]
    text += ["", f"Per task: estimate ± detectable difference. {records} test records in all. The smallest relative "
             f"difference of averaged PPL this design detects at p < 0.05 is about {detectable:.2%} (median over "
             f"the comparisons); the paper's claimed average gain is {PAPER_GAIN:.2%}. Every run trains on one split "
             f"(data seed {study.settings.data_seed}): the split's own variance is not in these intervals."]
    text += ["", "### Knowledge retention (general English text outside the tasks)", "",
             "Change of the token-level NLL (nats/token) on the Wikipedia passages after training, against the "
             "base model (positive: forgetting), paired over passages, 95% CI over passages and seeds; and "
             "HyCAM's change minus each method's.", "", "| Method | ΔNLL vs base | HyCAM minus it |",
             "| --- | --- | --- |"]
    for method, result in lost.items():
        other = found.get(method, {}).get("retention")
        text.append(f"| {names[method]} | {_ci(result, False)} | {_ci(other, False) if other else '-'} |")
    return "\n".join(text)


def flattening(study: Study) -> dict[str, list[tuple[int, float]]]:
    """Run name -> (step, validation loss) of every finished main run."""
    curves = {}
    for run in study.main_runs():
        file = study.run_dir(run) / "metrics.jsonl"
        if study.status(run) == "done":
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            curves[run.name] = [(r["step"], r["loss"]) for r in rows if r["split"] == "validation"]
    return curves


def flattening_section(study: Study) -> str:
    """The validation loss at every evaluation, and the last interval's drop as a share of the first's."""
    curves = flattening(study)
    if not curves:
        return ""
    steps = sorted({step for curve in curves.values() for step, _ in curve})
    lines = ["## Validation loss during training", "", "| run | " + " | ".join(f"step {s}" for s in steps)
             + " | last drop / first drop |", "| --- " * (len(steps) + 2) + "|"]
    for name, curve in curves.items():
        losses = dict(curve)
        values = [losses[s] for s in steps if s in losses]
        ratio = ((values[-2] - values[-1]) / (values[0] - values[1]) if len(values) > 2 and values[0] != values[1]
                 else float("nan"))
        lines.append(f"| {name} | " + " | ".join(f"{losses[s]:.4f}" if s in losses else "-" for s in steps)
                     + f" | {ratio:.2f} |")
    lines += ["", "A ratio near 0 means the loss has flattened by the end (a negative one: it rose again)."]
    return "\n".join(lines)


def paired_claims(study: Study, verdict, names: dict[str, str]) -> list[str]:
    """The paper's central claims measured record by record: lower PPL than each baseline, and better
    retention of general knowledge."""
    found = comparisons(study)
    if not found:
        return []
    wins = {m: r["ppl"]["high"] < 0 for m, r in found.items()}
    gains = [-r["ppl"]["estimate"] for r in found.values()]
    claims = [verdict(all(wins.values()), "HyCAM's averaged PPL is lower than each other method's, paired over "
                      "the same test records (95% CI below 0).", "; ".join(
                          f"vs {names[m]}: {_ci(r['ppl'], True)}" for m, r in found.items())),
              verdict(bool(np.min(gains) >= PAPER_GAIN) if gains else None, "HyCAM lowers PPL by 3.65% or more "
                      "against every compared method.", f"smallest gain {min(gains):+.2%}")]
    kept = {m: r["retention"] for m, r in found.items() if "retention" in r}
    if kept:
        claims.append(verdict(all(r["high"] < 0 for r in kept.values()), "HyCAM keeps more general knowledge than "
                              "each other method (a smaller rise of the general-text NLL, 95% CI below 0).",
                              "; ".join(f"vs {names[m]}: {_ci(r, False)}" for m, r in kept.items())))
    return claims
