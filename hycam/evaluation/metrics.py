"""BLEU-4, ROUGE-L and perplexity, offline, with the values Hugging Face `evaluate` 0.4.3 returns.

The paper's authors scored generations with `evaluate.load("bleu")` and `evaluate.load("rouge")`.
`evaluate.load` fetches the metric scripts from the Hub, which a training node often cannot reach,
so the same computations are restated here on top of the libraries those scripts wrap:

- `bleu`: sacrebleu's `tokenizer_13a` (the tokenizer evaluate vendors from sacrebleu) and the
  corpus BLEU of tensorflow/nmt's `compute_bleu` that evaluate wraps: n-gram counts clipped by the
  element-wise maximum over a prediction's references, precisions pooled over the corpus, no
  smoothing, and a brevity penalty whose reference length is the *shortest* reference of each
  prediction (sacrebleu and nltk use the closest one, so their corpus BLEU differs with several
  references).
- `rouge`: rouge_score's `RougeScorer(["rougeL"], use_stemmer=False)`, evaluate's default (no
  stemming; rouge_score's tokenizer lower-cases and keeps only [a-z0-9] runs); with several
  references the one of highest F counts (`score_multi`).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Sequence, Union

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

References = Union[Sequence[str], Sequence[Sequence[str]]]

MAX_ORDER = 4
BOOTSTRAP_SAMPLES = 1000
"""rouge_score's BootstrapAggregator default, which evaluate uses."""
ROUGE_TYPES_BEFORE_L = 2
"""rouge1 and rouge2 precede rougeL in evaluate's default `rouge_types`."""

_tokenize_13a = Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """Split text as mteval-v13a does (WMT's tokenizer and evaluate's BLEU default)."""
    return _tokenize_13a(text).split()


def _reference_lists(predictions: Sequence[str], references: References, caller: str) -> list[list[str]]:
    """Check the inputs and give every prediction a list of references (one string becomes [string])."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError(f"{caller}: predictions and references must be lists, not a single string")
    if len(predictions) == 0:
        raise ValueError(f"{caller}: predictions is empty")
    if len(predictions) != len(references):
        raise ValueError(
            f"{caller}: {len(predictions)} predictions but {len(references)} references; "
            "give one reference (or one list of references) per prediction"
        )
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"{caller}: predictions[{i}] is {type(prediction).__name__}, expected str")
    return [_as_list(refs, i, caller) for i, refs in enumerate(references)]


def _as_list(refs: str | Sequence[str], index: int, caller: str) -> list[str]:
    """One prediction's references as a non-empty list of strings."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError(f"{caller}: references[{index}] is an empty list; each prediction needs a reference")
    for ref in refs:
        if not isinstance(ref, str):
            raise ValueError(f"{caller}: references[{index}] holds a {type(ref).__name__}, expected str")
    return refs


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    """Counts of every n-gram of order 1..max_order, keyed by token tuple (its length is the order)."""
    return Counter(
        tuple(tokens[start : start + order])
        for order in range(1, max_order + 1)
        for start in range(len(tokens) - order + 1)
    )


def _clipped_matches(prediction: list[str], references: list[list[str]], max_order: int) -> list[int]:
    """Matches per order, each n-gram counted at most as often as in the reference using it most."""
    ceiling: Counter = Counter()
    for reference in references:
        ceiling |= _ngrams(reference, max_order)
    matches = [0] * max_order
    for ngram, count in (_ngrams(prediction, max_order) & ceiling).items():
        matches[len(ngram) - 1] += count
    return matches


def bleu4(predictions: Sequence[str], references: References) -> float:
    """Corpus BLEU-4 in [0, 1]: brevity penalty times the geometric mean of pooled n-gram precisions.

    Same value as `evaluate.load("bleu").compute(...)["bleu"]` with its defaults (tokenizer_13a,
    max_order=4, smooth=False). `references` holds one string or one list of strings per prediction.
    Any order without a single match makes the score 0, as in the unsmoothed original.
    """
    reference_lists = _reference_lists(predictions, references, "bleu4")
    matches, possible = [0] * MAX_ORDER, [0] * MAX_ORDER
    pred_length = ref_length = 0
    for prediction, refs in zip(predictions, reference_lists):
        pred_tokens, ref_tokens = tokenize_13a(prediction), [tokenize_13a(r) for r in refs]
        pred_length += len(pred_tokens)
        ref_length += min(len(r) for r in ref_tokens)
        found = _clipped_matches(pred_tokens, ref_tokens, MAX_ORDER)
        for order in range(MAX_ORDER):
            matches[order] += found[order]
            possible[order] += max(len(pred_tokens) - order, 0)
    if pred_length == 0 or ref_length == 0 or min(matches) == 0:
        return 0.0
    # Same float operations as nmt's compute_bleu so the value agrees to the last bit.
    geo_mean = math.exp(sum(math.log(m / p) / MAX_ORDER for m, p in zip(matches, possible)))
    ratio = pred_length / ref_length
    brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * brevity_penalty


def rouge_l(predictions: Sequence[str], references: References, bootstrap_seed: int | None = None) -> float:
    """ROUGE-L F-measure (LCS-based) over examples, in [0, 1]; by default their plain mean.

    `evaluate.load("rouge")` reports `BootstrapAggregator().aggregate()["rougeL"].mid.fmeasure`:
    the median of 1,000 means of bootstrap resamples of the per-example F, drawn from numpy's
    global generator seeded with the metric's `seed`, which evaluate takes from numpy's global state
    when the metric is loaded unless given. That median moves from run to run by Monte Carlo noise
    (up to 1.6e-3 seen on 200 real examples); its expectation is the plain mean, returned here so
    that scores are deterministic. Pass `bootstrap_seed=s` to get, bit for bit,
    what `evaluate.load("rouge", seed=s)` returns, without touching numpy's global generator.
    """
    reference_lists = _reference_lists(predictions, references, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = np.array(
        [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, reference_lists)]
    )
    if bootstrap_seed is None:
        return float(scores.mean())
    return _bootstrap_median_of_means(scores, bootstrap_seed)


def _bootstrap_median_of_means(scores: np.ndarray, seed: int) -> float:
    """rouge_score's BootstrapAggregator "mid" as evaluate computes it under `np.random.seed(seed)`.

    evaluate scores rouge1, rouge2, rougeL and rougeLsum, in that order, and the aggregator
    resamples each in turn from the one generator, so rougeL's resamples are the third block of
    draws. A private legacy RandomState yields the same indices as those global `np.random.choice`
    calls, and the global generator is left alone.
    """
    rng = np.random.RandomState(seed)
    for _ in range(ROUGE_TYPES_BEFORE_L * BOOTSTRAP_SAMPLES):
        rng.choice(len(scores), size=len(scores))
    resamples = scores[np.stack([rng.choice(len(scores), size=len(scores)) for _ in range(BOOTSTRAP_SAMPLES)])]
    # The aggregator's column means add rows one after another; cumsum does too, where .mean() would
    # sum pairwise and differ in the last bits.
    means = resamples.cumsum(axis=1)[:, -1] / len(scores)
    return float(np.percentile(means, 50))


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(total_nll / num_tokens): the per-token perplexity of a whole evaluation set.

    Pooling the summed negative log-likelihood (natural log) over all target tokens before
    exponentiating weights every token equally, unlike averaging per-batch perplexities.
    Returns inf when the mean NLL is too large for a float exponent.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens <= 0:
        raise ValueError(f"perplexity: num_tokens must be a positive int, got {num_tokens!r}")
    if not math.isfinite(total_nll) or total_nll < 0:
        raise ValueError(f"perplexity: total_nll must be a finite sum of -log p >= 0, got {total_nll!r}")
    try:
        return math.exp(total_nll / num_tokens)
    except OverflowError:
        return math.inf
