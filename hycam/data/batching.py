"""From tokenised examples to batches: padding and the multi-task shuffle."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (PyTorch's and transformers' default ignore_index)."""


def collate(batch: Sequence[dict], pad_token_id: int) -> dict:
    """Right-pad a list of tokenised examples to its longest one, as torch.long tensors.

    Pads get attention 0 and label -100, so they count in no loss. ``"task"`` stays a list of str
    (for per-task losses): pop it before ``model(**batch)``.
    """
    if not batch:
        raise ValueError("collate: the batch is empty")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None; pass tokenizer.pad_token_id or eos_token_id")
    width = max(len(example["input_ids"]) for example in batch)

    def padded(key: str, value: int) -> torch.Tensor:
        rows = [list(example[key]) + [value] * (width - len(example[key])) for example in batch]
        return torch.tensor(rows, dtype=torch.long)

    return {"input_ids": padded("input_ids", pad_token_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX), "task": [example["task"] for example in batch]}


def multitask_batches(examples: Sequence[dict], batch_size: int, seed: int, epoch: int = 0,
                      drop_last: bool = False) -> list[list[dict]]:
    """All tasks' examples shuffled together into batches, the same for the same seed and epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    random.Random(f"hycam-batches:{seed}:{epoch}").shuffle(order)
    batches = [[examples[i] for i in order[start:start + batch_size]]
               for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
