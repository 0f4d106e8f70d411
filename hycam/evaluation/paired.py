"""Paired comparison of two methods scored on the same records: bootstrap CIs and the detectable difference.

In a paired study every method and seed trains on the same split and data order (main.py --data_seed), so
two methods' evaluations score the same test records and differ only by the method and by each seed's
initialisation and routing noise. Comparing them record by record removes the records' own difficulty,
which dominates the spread of unpaired per-seed means.

One bootstrap replicate redraws the records of every task with replacement (the same draw for both
methods: the pairing) and each method's seeds with replacement (a method's seeds are independent
replicates of it). Two statistics:

- `"ppl"`: the relative difference of the paper's averaged PPL (the unweighted mean over tasks of each
  task's token-level PPL), each method's averaged over its seeds: mean_s PPL_a(s) / mean_s PPL_b(s) - 1.
- `"nll"`: the difference of the token-level mean NLL over all records, averaged over seeds (nats).

The smallest difference the design detects at p < 0.05 (two-sided) is z_0.975 x SE, with SE the
bootstrap standard error of the statistic; with 80 % power, (z_0.975 + z_0.8) x SE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_975, Z_80 = 1.959964, 0.841621
"""Standard normal quantiles: two-sided p < 0.05, and 80 % power."""
STATISTICS = ("ppl", "nll")


@dataclass
class RecordScores:
    """One method's response NLL on a fixed list of records, for each of its seeds."""

    ids: list[str]
    """Record ids (`hycam.evaluation.scoring.record_id`), in order: two methods are compared only on the same ids."""
    tasks: list[str]
    """The task of each record."""
    tokens: np.ndarray
    """(records,) scored tokens of each record (the same for every seed and method)."""
    nll: np.ndarray
    """(seeds, records) summed NLL of each record's scored tokens, natural log."""


def scores_from_results(results: Sequence[dict]) -> RecordScores:
    """The per-record NLL of one method's evaluations (results.json of hycam-eval, one per seed), without
    records whose prompt left no room to score; every evaluation must have scored the same records."""
    if not results:
        raise ValueError("scores_from_results: no evaluations given")
    first = results[0]["records"]
    for result in results[1:]:
        if [r["id"] for r in result["records"]] != [r["id"] for r in first]:
            raise ValueError(f"{result.get('method')} seed {result.get('seed')} scored other records than "
                             f"seed {results[0].get('seed')}: not a paired study")
    kept = [i for i, r in enumerate(first) if r["nll"] is not None and r["tokens"] > 0]
    nll = np.array([[result["records"][i]["nll"] for i in kept] for result in results], dtype=np.float64)
    return RecordScores([first[i]["id"] for i in kept], [first[i]["task"] for i in kept],
                        np.array([first[i]["tokens"] for i in kept], dtype=np.float64), nll)


def _record_draws(tasks: Sequence[str], reps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per task, (reps, records of the task) indices drawn with replacement within the task."""
    groups = [np.flatnonzero(np.asarray(tasks) == task) for task in dict.fromkeys(tasks)]
    return [group[rng.integers(0, len(group), (reps, len(group)))] for group in groups]


def _per_seed(scores: RecordScores, draws: list[np.ndarray], statistic: str) -> np.ndarray:
    """(reps, seeds): each replicate's averaged PPL or mean NLL, per seed."""
    sums = [(scores.nll[:, d].sum(-1).T, scores.tokens[d].sum(-1)[:, None]) for d in draws]  # (reps, S), (reps, 1)
    if statistic == "ppl":
        return np.mean([np.exp(nll / tokens) for nll, tokens in sums], axis=0)
    return sum(nll for nll, _ in sums) / sum(tokens for _, tokens in sums)


def _combine(a: np.ndarray, b: np.ndarray, statistic: str) -> np.ndarray:
    return a / b - 1 if statistic == "ppl" else a - b


def paired_bootstrap(a: RecordScores, b: RecordScores, statistic: str = "ppl", reps: int = 4000,
                     seed: int = 0) -> dict:
    """Method a against method b on the same records: the point estimate, a 95 % percentile CI, the
    bootstrap SE, a two-sided bootstrap p-value and the smallest detectable difference (see the module)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if a.ids != b.ids:
        raise ValueError("paired_bootstrap: the two methods scored different records")
    rng = np.random.default_rng(seed)
    whole = [np.arange(len(a.ids))[np.asarray(a.tasks) == t][None] for t in dict.fromkeys(a.tasks)]
    point = _combine(_per_seed(a, whole, statistic).mean(), _per_seed(b, whole, statistic).mean(), statistic)
    draws = _record_draws(a.tasks, reps, rng)
    values = []
    for scores in (a, b):
        seeds = rng.integers(0, scores.nll.shape[0], (reps, scores.nll.shape[0]))
        values.append(np.take_along_axis(_per_seed(scores, draws, statistic), seeds, 1).mean(1))
    diffs = _combine(values[0], values[1], statistic)
    se = float(diffs.std(ddof=1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    p_value = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return {"statistic": statistic, "estimate": float(point), "low": float(low), "high": float(high), "se": se,
            "p_value": p_value, "detectable": Z_975 * se, "detectable_80": (Z_975 + Z_80) * se,
            "seeds": [a.nll.shape[0], b.nll.shape[0]], "records": len(a.ids)}
