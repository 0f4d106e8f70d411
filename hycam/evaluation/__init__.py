"""The evaluation harness: ``hycam-eval``, comparison tables and plots.

- ``evaluate``: the ``hycam-eval`` command: PPL, BLEU-4 and ROUGE-L per task of a trained checkpoint
  or of the base model, written to results.json, results.md and generations.jsonl.
- ``selection``: which records it scores (the run's test split, or the user's files whole).
- ``loading``: the model it scores (a checkpoint on its base model, or the base model), read once.
- ``scoring``: the numbers of one model on chosen records, and each record's id and NLL.
- ``generation``: response-token NLL, and batched greedy decoding with the KV cache.
- ``metrics``: BLEU-4, ROUGE-L and perplexity, offline.
- ``precision``: whether bfloat16 is fast on a device (``--dtype auto``).
- ``tables``, ``compare``: the paper's tables over methods and seeds (``python -m hycam.evaluation.compare``).
- ``paired``, ``retention``: paired bootstrap of two methods on the same records; NLL on general text.
- ``plots``: the analysis figures of a model (modulation maps, expert usage, t-SNE); ``loss_curves``: training's.
- ``speed``: training-step and decoding timings (``scripts/benchmark.py``).

Imports the method, ``hycam.baselines`` and ``hycam.data``; never ``hycam.train``. Within it, one way:
metrics, generation, selection, precision, tables -> loading, scoring -> evaluate -> compare; retention
uses loading and scoring, speed uses generation, loss_curves uses plots; paired and plots import no other part.
"""
