"""BLEU-4, ROUGE-L and perplexity against hand-worked values and independent implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from rouge_score import rouge_scorer, scoring

from hycam.evaluation.metrics import bleu4, perplexity, rouge_l, tokenize_13a



def _real_outputs(task: str, count: int) -> list[str]:
    path = SHARED_DATA / f"{task}.jsonl"
    if not path.exists():
        pytest.skip(f"task data not found at {path}")
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line)["output"] for _, line in zip(range(count), lines)]


def _degraded(references: list[str]) -> list[str]:
    """Predictions of middling quality: each reference's first half, then a piece of the next one."""
    return [
        " ".join(ref.split()[: len(ref.split()) // 2]) + " " + references[(i + 1) % len(references)][:60]
        for i, ref in enumerate(references)
    ]


# BLEU-4


def test_bleu_identical_texts_score_one() -> None:
    assert bleu4(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == 1.0


def test_bleu_disjoint_texts_score_zero() -> None:
    assert bleu4(["alpha beta gamma delta"], ["one two three four"]) == 0.0


def test_bleu_brevity_penalty_worked_by_hand() -> None:
    # prediction: the cat sat on the mat (c = 6); reference: the cat sat on the red mat today (r = 8)
    p1 = 6 / 6  # the, cat, sat, on, the, mat: all found (the twice in both)
    p2 = 4 / 5  # the cat, cat sat, sat on, on the found; the mat missing
    p3 = 3 / 4  # the cat sat, cat sat on, sat on the found; on the mat missing
    p4 = 2 / 3  # the cat sat on, cat sat on the found; sat on the mat missing
    expected = math.exp(1 - 8 / 6) * (p1 * p2 * p3 * p4) ** 0.25
    score = bleu4(["the cat sat on the mat"], ["the cat sat on the red mat today"])
    assert score == pytest.approx(expected, rel=1e-12)


def test_bleu_clips_repeated_ngrams() -> None:
    # "a b c d a b c d" against "a b c d": each n-gram counts at most once; c = 8 > r = 4, so BP = 1.
    expected = (4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25
    assert bleu4(["a b c d a b c d"], ["a b c d"]) == pytest.approx(expected, rel=1e-12)


def test_bleu_pools_counts_over_the_corpus() -> None:
    # A perfect pair and a disjoint pair: pooled precisions 4/9, 3/7, 2/5, 1/3, lengths 9 = 9.
    # The mean of sentence BLEUs would be 0.5.
    expected = (4 / 9 * 3 / 7 * 2 / 5 * 1 / 3) ** 0.25
    score = bleu4(["a b c d", "e f g h i"], ["a b c d", "v w x y z"])
    assert score == pytest.approx(expected, rel=1e-12)


def test_bleu_short_segment_adds_no_higher_order_slots() -> None:
    # "x y" has no 3- or 4-grams, so the pooled 4-gram precision stays 2/2 and the score 1.
    assert bleu4(["a b c d e", "x y"], ["a b c d e", "x y"]) == 1.0


def test_bleu_13a_splits_punctuation() -> None:
    assert bleu4(["Hello, world! How are you?"], ["Hello , world ! How are you ?"]) == 1.0


def test_tokenize_13a_rules() -> None:
    tokens = tokenize_13a("Hello, world! It's 3.5-4 km, 1,000 well-known &amp; (ok).")
    assert tokens == [
        "Hello", ",", "world", "!", "It's", "3.5", "-", "4", "km", ",",
        "1,000", "well-known", "&", "(", "ok", ")", ".",
    ]  # fmt: skip


def test_bleu_multi_reference_clips_by_the_best_reference() -> None:
    # Each n-gram may match up to its count in whichever reference has most of it:
    # unigrams 6/6, bigrams 5/5, trigrams 4/4, 4-grams 2/3 (b c d e is in neither); c = r = 6.
    score = bleu4(["a b c d e f"], [["a b c d x y", "z w c d e f"]])
    assert score == pytest.approx((2 / 3) ** 0.25, rel=1e-12)


def test_bleu_multi_reference_brevity_uses_the_shortest_reference() -> None:
    # c = 5; the shortest reference has 3 tokens, so no penalty. The closest (6 tokens), which
    # sacrebleu and nltk use, would give exp(1 - 6/5).
    assert bleu4(["a b c d e"], [["a b c", "a b c d e f"]]) == 1.0


def test_bleu_matches_sacrebleu_on_real_single_reference_data() -> None:
    references = _real_outputs("webgpt", 60)
    predictions = _degraded(references)
    expected = sacrebleu.corpus_bleu(predictions, [references], tokenize="13a", smooth_method="none").score / 100
    score = bleu4(predictions, references)
    assert 0.05 < score < 0.95
    assert score == pytest.approx(expected, rel=1e-9)


# ROUGE-L


def test_rouge_l_worked_from_lcs() -> None:
    # LCS of "the cat was found under the bed" (7 tokens) and "the cat was under the bed" (6) is 6.
    precision, recall = 6 / 7, 6 / 6
    expected = 2 * precision * recall / (precision + recall)
    assert rouge_l(["the cat was found under the bed"], ["the cat was under the bed"]) == pytest.approx(expected)


def test_rouge_l_averages_examples_and_ignores_case_and_punctuation() -> None:
    # Pair 1 is identical after lower-casing and dropping punctuation (F = 1); pair 2 has
    # LCS "b d" = 2, P = 2/4, R = 2/3, F = 4/7; pair 3 shares nothing (F = 0).
    score = rouge_l(["The CAT, sat.", "a b c d", "x"], ["the cat sat", "b d e", "y"])
    assert score == pytest.approx((1 + 4 / 7 + 0) / 3)


def test_rouge_l_disjoint_texts_score_zero() -> None:
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0


def test_rouge_l_multi_reference_takes_the_best_reference() -> None:
    # Against "b d e" alone F = 4/7; against "a b c d" F = 1; the better one counts.
    assert rouge_l(["a b c d"], [["b d e", "a b c d"]]) == pytest.approx(1.0)
    assert rouge_l(["a b c d"], [["b d e", "x"]]) == pytest.approx(4 / 7)


def test_rouge_l_bootstrap_seed_reproduces_evaluates_aggregator() -> None:
    # What evaluate.load("rouge", seed=7).compute() does: score four types, bootstrap under the seed.
    references = _real_outputs("dolly", 40)
    predictions = _degraded(references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        aggregator.add_scores(scorer.score(reference, prediction))
    state = np.random.get_state()
    np.random.seed(7)
    expected = aggregator.aggregate()["rougeL"].mid.fmeasure
    np.random.set_state(state)
    assert rouge_l(predictions, references, bootstrap_seed=7) == expected


def test_rouge_l_bootstrap_leaves_numpy_global_state_alone() -> None:
    before = np.random.get_state()[1].copy()
    rouge_l(["a b c", "a c"], ["a b", "b c"], bootstrap_seed=3)
    assert np.array_equal(np.random.get_state()[1], before)


# Perplexity


def test_perplexity_of_uniform_predictions_is_vocab_size() -> None:
    vocab, tokens = 128, 50
    logits = torch.zeros(tokens, vocab)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    total_nll = F.cross_entropy(logits, targets, reduction="sum").item()
    assert perplexity(total_nll, tokens) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_weights_tokens_not_batches() -> None:
    # Batch 1: 1 token with NLL 2; batch 2: 3 tokens with NLL 0.5 each. Per token: 3.5 / 4.
    assert perplexity(2.0 + 3 * 0.5, 1 + 3) == pytest.approx(math.exp(3.5 / 4))


# Errors


@pytest.mark.parametrize("metric", [bleu4, rouge_l])
def test_empty_predictions_rejected(metric) -> None:
    with pytest.raises(ValueError, match="predictions is empty"):
        metric([], [])


@pytest.mark.parametrize("metric", [bleu4, rouge_l])
def test_length_mismatch_rejected(metric) -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a b", "c d"], ["a b"])


@pytest.mark.parametrize("metric", [bleu4, rouge_l])
def test_empty_reference_list_rejected(metric) -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is an empty list"):
        metric(["a b", "c d"], [["a b"], []])


@pytest.mark.parametrize("metric", [bleu4, rouge_l])
def test_bare_string_rejected(metric) -> None:
    with pytest.raises(ValueError, match="not a single string"):
        metric("a b", "a b")


def test_non_string_prediction_rejected() -> None:
    with pytest.raises(ValueError, match=r"predictions\[0\] is int"):
        bleu4([3], ["a"])


@pytest.mark.parametrize(("total_nll", "num_tokens", "message"), [
    (1.0, 0, "num_tokens must be a positive int"),
    (-1.0, 3, "total_nll must be a finite"),
    (float("nan"), 3, "total_nll must be a finite"),
])  # fmt: skip
def test_perplexity_rejects_bad_input(total_nll: float, num_tokens: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perplexity(total_nll, num_tokens)


def test_rouge_l_does_not_stem() -> None:
    # evaluate's default use_stemmer=False: "running dogs" and "runs dog" share no token.
    assert rouge_l(["running dogs"], ["runs dog"]) == 0.0
