"""The paired bootstrap on constructed scores whose answers are known, and the records it reads."""

import math

import numpy as np
import pytest

from hycam.evaluation.paired import RecordScores, paired_bootstrap, scores_from_results


def scores(nll, tasks=None, tokens=None) -> RecordScores:
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    count = nll.shape[1]
    return RecordScores([f"r{i}" for i in range(count)], tasks or ["t"] * count,
                        np.ones(count) if tokens is None else np.asarray(tokens, dtype=np.float64), nll)


def test_a_uniform_ppl_ratio_is_the_estimate_with_a_ci_of_zero_width():
    tasks, tokens = ["a", "b"] * 50, np.arange(1, 101)
    base = scores(np.tile(np.linspace(0.5, 2.0, 100) * tokens, (2, 1)), tasks, tokens)
    worse = scores(base.nll + tokens * math.log(1.1), tasks, tokens)  # every record's PPL x 1.1, both seeds
    result = paired_bootstrap(worse, base, "ppl")
    assert result["estimate"] == pytest.approx(0.1, abs=1e-12)
    assert (result["low"], result["high"]) == pytest.approx((0.1, 0.1), abs=1e-12)
    assert result["p_value"] == 0.0 and result["detectable"] == pytest.approx(0.0, abs=1e-12)
    assert paired_bootstrap(worse, base, "nll")["estimate"] == pytest.approx(math.log(1.1), abs=1e-12)


def test_the_detectable_difference_is_1_96_standard_errors_of_the_paired_mean():
    # 400 one-token records whose NLL differs by +-0.01: SE of the mean difference 0.01 / sqrt(400).
    base = scores(np.zeros(400))
    noisy = scores(np.where(np.arange(400) % 2 == 0, 0.01, -0.01))
    result = paired_bootstrap(noisy, base, "nll", reps=4000)
    assert result["estimate"] == pytest.approx(0.0, abs=1e-15)
    assert result["se"] == pytest.approx(0.0005, rel=0.05)
    assert result["detectable"] == pytest.approx(1.959964 * result["se"], rel=1e-12)
    assert result["detectable_80"] == pytest.approx((1.959964 + 0.841621) * result["se"], rel=1e-12)
    assert result["low"] < 0 < result["high"] and result["p_value"] > 0.5


def test_seeds_are_resampled_as_replicates_of_a_method():
    # Seed PPLs 1.0 and 1.2 against 1.0: resampled seed means are 1.0, 1.1 or 1.2, a quarter each at the ends.
    two = scores(np.stack([np.zeros(200), np.full(200, math.log(1.2))]))
    result = paired_bootstrap(two, scores(np.zeros(200)), "ppl")
    assert result["estimate"] == pytest.approx(0.1)
    assert (result["low"], result["high"]) == pytest.approx((0.0, 0.2), abs=1e-12)


def test_the_same_records_in_both_methods_are_required():
    a, b = scores(np.zeros(3)), scores(np.zeros(3))
    b.ids = ["x", "y", "z"]
    with pytest.raises(ValueError, match="different records"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="statistic"):
        paired_bootstrap(a, a, "bleu")


def test_scores_come_from_evaluations_of_the_same_records_and_skip_unscored_ones():
    rows = [{"task": "t", "id": "a", "nll": 1.0, "tokens": 2}, {"task": "t", "id": "b", "nll": None, "tokens": 0},
            {"task": "u", "id": "c", "nll": 3.0, "tokens": 1}]
    other = [{**rows[0], "nll": 1.5}, rows[1], {**rows[2], "nll": 2.0}]
    read = scores_from_results([{"seed": 1, "records": rows}, {"seed": 2, "records": other}])
    assert (read.ids, read.tasks, read.tokens.tolist()) == (["a", "c"], ["t", "u"], [2.0, 1.0])
    assert read.nll.tolist() == [[1.0, 3.0], [1.5, 2.0]]
    with pytest.raises(ValueError, match="not a paired study"):
        scores_from_results([{"seed": 1, "records": rows}, {"seed": 2, "records": rows[::-1]}])
