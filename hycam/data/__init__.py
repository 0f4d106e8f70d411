"""What both harnesses read: task records, prompts and batches, and base models from disk.

Imports nothing of hycam outside this package: the training and the evaluation harness both build
on it, and it builds on neither.

- ``records``: read, check, split and generate task records (``Record``, ``DataError``).
- ``prompts``: a record as prompt text and token ids with response-only labels.
- ``batching``: padding and the multi-task shuffle.
- ``models``: a base model and tokenizer from a directory, a GGUF file or a packaged model.
"""

from hycam.data.batching import IGNORE_INDEX, collate, multitask_batches
from hycam.data.prompts import TokenizeStats, format_prompt, prompt_ids, tokenize_record, tokenize_records
from hycam.data.records import (DataError, Record, first_per_task, load_records, split_records,
                                synthetic_tasks)

__all__ = ["DataError", "IGNORE_INDEX", "Record", "TokenizeStats", "collate", "first_per_task",
           "format_prompt", "load_records", "multitask_batches", "prompt_ids", "split_records",
           "synthetic_tasks", "tokenize_record", "tokenize_records"]
