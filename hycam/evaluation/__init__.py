"""The evaluation harness: ``hycam-eval``, comparison tables and plots.

- ``evaluate``: the ``hycam-eval`` command: PPL, BLEU-4 and ROUGE-L per task of a trained checkpoint
  or of the base model.
- ``selection``: which records it scores (the run's test split, or the user's files whole).
- ``generation``: batched greedy decoding with the KV cache, and response NLL.
- ``metrics``: BLEU-4, ROUGE-L and perplexity, offline.
- ``tables``, ``compare``: the paper's tables over methods and seeds (``python -m hycam.evaluation.compare``).
- ``plots``: loss curves, expert usage, modulation maps and t-SNE figures.

Imports the method, ``hycam.baselines`` and ``hycam.data``; never ``hycam.train``.
"""
