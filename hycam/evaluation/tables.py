"""Paper-style result tables: mean ± std over seeds, the best in bold, * for a significant win.

Input is the JSON the evaluation command writes, one record per (method, seed):
`{"method": str, "seed": int, "tasks": {task: {"ppl", "bleu", "rouge_l"}}, "average": {...}}`.
The overall table reads each record's `average` (as the evaluation command defined it) and falls
back to the unweighted mean over tasks when a record has none.

Significance follows the paper's tables ("two-sided t-test with p < 0.05 over the best baseline"):
per column, the best method is tested against the best baseline with Welch's two-sided t-test
(`scipy.stats.ttest_ind(equal_var=False)`) over seeds. Welch, not a paired test, because methods
need not share seeds and their seed-to-seed variances may differ. Without `baseline_methods`, every
other method is a baseline, so the best is tested against the runner-up; with it, a column whose
best is itself a baseline gets no test. Stds are sample stds (ddof=1); one seed gives no std and
no test. Bold marks the best of two or more methods (a one-row table, as of one checkpoint, has
none), and each table's caption names only what it shows (`caption`).
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from scipy import stats

METRICS = ("ppl", "bleu", "rouge_l")
LABELS = {"ppl": "PPL↓", "bleu": "BLEU-4↑", "rouge_l": "ROUGE-L↑"}
LOWER_IS_BETTER = frozenset({"ppl"})
ALPHA = 0.05
DIGITS = 3
"""Decimals shown, as in the paper's tables."""
STD_NOTE = "Mean ± sample std over seeds."
BOLD_NOTE = "Best per column in **bold**"
TEST_NOTE = f"\\* marks p < {ALPHA} in a two-sided Welch t-test of the best method against the best baseline."


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """Read result records from JSON files, each holding one record or a list of records."""
    labelled = []
    for path in paths:
        try:
            content = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if isinstance(content, dict):
            labelled.append((str(path), content))
        elif isinstance(content, list):
            labelled.extend((f"{path}[{i}]", record) for i, record in enumerate(content))
        else:
            raise ValueError(f"{path}: expected a result record or a list of them, got {type(content).__name__}")
    _check_results(labelled)
    return [record for _, record in labelled]


def _check_results(labelled: Sequence[tuple[str, Any]]) -> None:
    """Every record well formed, no (method, seed) twice, every record on the same tasks."""
    if not labelled:
        raise ValueError("no result records given")
    seen: dict[tuple[str, int], str] = {}
    first_where, first = labelled[0]
    for where, record in labelled:
        _check_record(record, where)
        key = (record["method"], record["seed"])
        if key in seen:
            raise ValueError(f"{where}: method {key[0]!r} seed {key[1]} already read from {seen[key]}")
        seen[key] = where
        if set(record["tasks"]) != set(first["tasks"]):
            raise ValueError(
                f"{where}: tasks {sorted(record['tasks'])} differ from {sorted(first['tasks'])} in {first_where}"
            )


def _check_record(record: Any, where: str) -> None:
    """One record: a method name, an int seed, and every metric of every task (and of the average)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a result record must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("method"), str) or not record["method"]:
        raise ValueError(f"{where}: 'method' must be a non-empty string, got {record.get('method')!r}")
    seed = record.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: 'seed' must be an int, got {seed!r}")
    tasks = record.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"{where}: 'tasks' must be a non-empty object of task -> metrics")
    for task, values in tasks.items():
        _check_metrics(values, f"{where}: tasks.{task}")
    if "average" in record:
        _check_metrics(record["average"], f"{where}: average")


def _check_metrics(values: Any, where: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object with {', '.join(METRICS)}")
    for metric in METRICS:
        value = values.get(metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where}.{metric} must be a finite number, got {value!r}")


def _average(record: dict, metric: str) -> float:
    """The record's own task average if it has one, else the unweighted mean over its tasks."""
    if "average" in record:
        return float(record["average"][metric])
    return statistics.fmean(float(values[metric]) for values in record["tasks"].values())


def _values(results: Sequence[dict], metric: str, task: str | None) -> dict[str, list[float]]:
    """One column's values grouped by method (first-appearance order); task None is the average."""
    grouped: dict[str, list[float]] = {}
    for record in results:
        value = _average(record, metric) if task is None else float(record["tasks"][task][metric])
        grouped.setdefault(record["method"], []).append(value)
    return grouped


def _column(values: dict[str, list[float]], metric: str, baselines: frozenset[str] | None) -> dict:
    """Means, sample stds, seed counts, the best method(s) and the significance test of one column."""
    means = {method: statistics.fmean(vals) for method, vals in values.items()}
    top = (min if metric in LOWER_IS_BETTER else max)(means.values())
    best = [method for method, mean in means.items() if mean == top]
    return {
        "mean": means,
        "std": {method: statistics.stdev(vals) if len(vals) > 1 else None for method, vals in values.items()},
        "n": {method: len(vals) for method, vals in values.items()},
        "best": best,
        "test": _significance(values, means, best[0], metric, baselines),
    }


def _significance(
    values: dict[str, list[float]],
    means: dict[str, float],
    best: str,
    metric: str,
    baselines: frozenset[str] | None,
) -> dict | None:
    """Welch's two-sided t-test of the best method against the best baseline, if both have >= 2 seeds."""
    rivals = [m for m in means if m != best and (baselines is None or m in baselines)]
    if not rivals or (baselines is not None and best in baselines):
        return None
    baseline = (min if metric in LOWER_IS_BETTER else max)(rivals, key=means.__getitem__)
    if len(values[best]) < 2 or len(values[baseline]) < 2:
        return None
    p_value = float(stats.ttest_ind(values[best], values[baseline], equal_var=False).pvalue)
    # Seeds that agree exactly in both methods leave the statistic undefined (nan): no test.
    p_value = None if math.isnan(p_value) else p_value
    return {
        "method": best,
        "baseline": baseline,
        "p_value": p_value,
        "significant": p_value is not None and p_value < ALPHA,
    }


def summarize(results: Sequence[dict], baseline_methods: Iterable[str] | None = None) -> dict:
    """Per column (overall and per task, for each metric): means, stds, seeds, best and its t-test.

    Returns `{"methods", "tasks", "overall": {metric: column}, "per_task": {task: {metric: column}}}`
    where a column is `{"mean": {method: float}, "std": {method: float | None}, "n": {method: int},
    "best": [method, ...], "test": None | {"method", "baseline", "p_value", "significant"}}`.
    """
    _check_results([(f"results[{i}]", record) for i, record in enumerate(results)])
    methods = list(dict.fromkeys(record["method"] for record in results))
    baselines = _baselines(baseline_methods, methods)
    tasks = list(results[0]["tasks"])
    overall = {metric: _column(_values(results, metric, None), metric, baselines) for metric in METRICS}
    per_task = {
        task: {metric: _column(_values(results, metric, task), metric, baselines) for metric in METRICS}
        for task in tasks
    }
    return {"methods": methods, "tasks": tasks, "overall": overall, "per_task": per_task}


def _baselines(baseline_methods: Iterable[str] | None, methods: list[str]) -> frozenset[str] | None:
    """The named baselines as a set (a lone name counts as one), each checked to exist in the results."""
    if baseline_methods is None:
        return None
    baselines = frozenset([baseline_methods] if isinstance(baseline_methods, str) else baseline_methods)
    unknown = sorted(baselines - set(methods))
    if unknown:
        raise ValueError(f"baseline_methods {unknown} are not among the methods in the results: {methods}")
    return baselines


def _cell(column: dict, method: str) -> str:
    """'mean ± std', bold when best of two or more methods, followed by an escaped * when significantly better."""
    text = f"{column['mean'][method]:.{DIGITS}f}"
    if column["std"][method] is not None:
        text += f" ± {column['std'][method]:.{DIGITS}f}"
    if method in column["best"] and len(column["mean"]) > 1:
        text = f"**{text}**"
    test = column["test"]
    if test is not None and test["method"] == method and test["significant"]:
        text += "\\*"
    return text


def caption(columns: Sequence[dict]) -> str:
    """Says what a table of these columns shows, and only that: a std where a method has several seeds,
    bold where methods are compared, the t-test where one was made."""
    methods, seeds = len(columns[0]["mean"]), max(columns[0]["n"].values())
    notes = [STD_NOTE if seeds > 1 else ("One seed per method." if methods > 1 else "One run.")]
    if methods > 1 and any(column["test"] is not None for column in columns):
        notes.append(f"{BOLD_NOTE}; {TEST_NOTE}")
    elif methods > 1:
        notes.append(f"{BOLD_NOTE}.")
    return " ".join(notes)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_overall(results: Sequence[dict], baseline_methods: Iterable[str] | None = None) -> str:
    """Rows = methods; PPL, BLEU-4 and ROUGE-L averaged over tasks (the paper's main table)."""
    summary = summarize(results, baseline_methods)
    columns = [summary["overall"][metric] for metric in METRICS]
    rows = [[method] + [_cell(column, method) for column in columns] for method in summary["methods"]]
    return _table(["Method"] + [LABELS[m] for m in METRICS], rows) + "\n\n" + caption(columns) + "\n"


def markdown_per_task(results: Sequence[dict], baseline_methods: Iterable[str] | None = None) -> str:
    """Rows = methods; for each task its PPL, BLEU-4 and ROUGE-L (the paper's per-task table)."""
    summary = summarize(results, baseline_methods)
    columns = [(task, metric) for task in summary["tasks"] for metric in METRICS]
    header = ["Method"] + [f"{task} {LABELS[metric]}" for task, metric in columns]
    cells = [summary["per_task"][task][metric] for task, metric in columns]
    rows = [[method] + [_cell(column, method) for column in cells] for method in summary["methods"]]
    return _table(header, rows) + "\n\n" + caption(cells) + "\n"
