"""What both harnesses read: task records, prompts and batches, and base models from disk.

Imports nothing of hycam outside this package: the training and the evaluation harness both build
on it, and it builds on neither.

- ``records``: read, check, split and generate task records (``Record``, ``DataError``).
- ``sources``: every kind of ``--data`` / ``--tasks`` item: task files, saved datasets, ``hub:NAME``,
  ``synthetic``.
- ``prompts``: a record as prompt text and token ids with response-only labels.
- ``tokencache``: ``tokenize_records`` by ``datasets.map`` in several processes, cached between runs.
- ``batching``: padding and the multi-task shuffle.
- ``models``: a base model and tokenizer from a directory, a GGUF file or a packaged model.
"""

from hycam.data.batching import IGNORE_INDEX, collate, multitask_batches
from hycam.data.prompts import TokenizeStats, format_prompt, prompt_ids, tokenize_record, tokenize_records
from hycam.data.records import (DataError, Record, first_per_task, load_records, split_records,
                                synthetic_tasks)
from hycam.data.sources import SYNTHETIC, load_sources
from hycam.data.tokencache import tokenize_cached

__all__ = ["DataError", "IGNORE_INDEX", "Record", "SYNTHETIC", "TokenizeStats", "collate", "first_per_task",
           "format_prompt", "load_records", "load_sources", "multitask_batches", "prompt_ids", "split_records",
           "synthetic_tasks", "tokenize_cached", "tokenize_record", "tokenize_records"]
