"""The paper's claims, each checked against the study's results: held, did not hold, or not testable here."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from hycam import files
from hycam.checkpoint import read_json
from hycam.evaluation import tables
from hycam.study import layout
from hycam.study.methods import ABLATIONS, MAIN, NAMES, PEFT_BASELINES, labelled
from hycam.study.paired import PAPER_GAIN, ci_text, comparisons
from hycam.study.study import Study


def verdict(held: bool | None, claim: str, measured: str) -> str:
    word = {True: "Held", False: "Did not hold", None: "Not testable here"}[held]
    return f"- **{word}.** {claim} Measured: {measured}."


def all_claims(study: Study, results: list[dict]) -> list[str]:
    """Every claim the study's finished units can speak to, in the report's order."""
    summary = main_summary(results)
    claims = average_claims(summary[0]["overall"], summary[1]) + task_claims(summary[0]) if summary else []
    claims += paired_claims(study) + ablation_claim(results) + convergence_claim(study)
    return claims + expert_claim(study.root / layout.FIGURES)


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
    return [verdict(leads, "HyCAM has the best average PPL, BLEU-4 and ROUGE-L of the compared methods (Table 2).",
                    "; ".join(f"best {tables.LABELS[m]}: {', '.join(best[m])} ({overall[m]['mean'][best[m][0]]:.3f}; "
                              f"HyCAM {overall[m]['mean']['HyCAM']:.3f})" for m in tables.METRICS)),
            _significance_claim(overall, leads), _gain_claim(overall, baselines)]


def _significance_claim(overall: dict, leads: bool) -> str:
    tests = [overall[m]["test"] for m in tables.METRICS]
    tested = [(m, t) for m, t in zip(tables.METRICS, tests) if t is not None and t["p_value"] is not None]
    significant = None if len(tested) < len(tests) else all(t["significant"] for t in tests)
    return verdict(False if not leads else significant,
                   "HyCAM's lead over the best PEFT baseline is significant (two-sided t-test, p < 0.05).",
                   "HyCAM does not lead on every metric" if not leads else "; ".join(
                       f"{tables.LABELS[m]} p = {t['p_value']:.3g} vs {t['baseline']}" for m, t in tested)
                   or "one seed: no test")


def _gain_claim(overall: dict, baselines: list[str]) -> str:
    gains = {m: relative_gain(overall[m], m, baselines) for m in tables.METRICS}
    defined = [g for g in gains.values() if g is not None]
    gain = statistics.fmean(defined) if defined else None
    return verdict(None if gain is None else gain > 0, "HyCAM improves on the best baseline by 3.65% on average "
                   "over the metrics.", ("n/a" if gain is None else f"{gain:+.2%}") + " (" + ", ".join(
                       f"{tables.LABELS[m]} {'n/a' if g is None else f'{g:+.2%}'}" for m, g in gains.items()) + ")")


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


def paired_claims(study: Study) -> list[str]:
    """The paper's central claims measured record by record: lower PPL than each baseline, and better
    retention of general knowledge."""
    found = comparisons(study)
    if not found:
        return []
    wins = {m: r["ppl"]["high"] < 0 for m, r in found.items()}
    gains = [-r["ppl"]["estimate"] for r in found.values()]
    claims = [verdict(all(wins.values()), "HyCAM's averaged PPL is lower than each other method's, paired over "
                      "the same test records (95% CI below 0).", "; ".join(
                          f"vs {NAMES[m]}: {ci_text(r['ppl'], True)}" for m, r in found.items())),
              verdict(bool(np.min(gains) >= PAPER_GAIN) if gains else None, "HyCAM lowers PPL by 3.65% or more "
                      "against every compared method.", f"smallest gain {min(gains):+.2%}")]
    kept = {m: r["retention"] for m, r in found.items() if "retention" in r}
    if kept:
        claims.append(verdict(all(r["high"] < 0 for r in kept.values()), "HyCAM keeps more general knowledge than "
                              "each other method (a smaller rise of the general-text NLL, 95% CI below 0).",
                              "; ".join(f"vs {NAMES[m]}: {ci_text(r, False)}" for m, r in kept.items())))
    return claims


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
        file = study.run_dir(run) / files.METRICS
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
    if not (figures / f"{layout.EXPERTS}.json").is_file():
        return []
    stats = read_json(figures / f"{layout.EXPERTS}.json")
    tokens = sum(task["tokens"] for task in stats.values())
    layers = [[sum(task["tokens"] * task["mean_gate"][layer][k] for task in stats.values()) / tokens
               for k in range(len(gates))] for layer, gates in enumerate(next(iter(stats.values()))["mean_gate"])]
    gates, share = [g for layer in layers for g in layer], 1 / len(layers[0])
    entropy = statistics.fmean(e for task in stats.values() for e in task["entropy"]) / math.log(len(layers[0]))
    return [verdict(0.5 * share <= min(gates) and max(gates) <= 1.5 * share, "The load-balancing loss keeps the "
                    "specialized CAMs in balanced use (Sec. 3.3).", f"per-layer mean gates over all test tokens "
                    f"range {min(gates):.3f}..{max(gates):.3f} (uniform {share:.3f}; held if within 0.5x..1.5x); "
                    f"routing entropy {entropy:.0%} of uniform")]
