"""The task records a run trains on, and their tokenised train and validation splits."""

from __future__ import annotations

from collections.abc import Callable

from hycam.data import SYNTHETIC, Record, first_per_task, load_sources, split_records, tokenize_cached
from hycam.train.config import TrainConfig


def load_task_records(cfg: TrainConfig, log: Callable[[str], None]) -> list[Record]:
    """The records of every --data item (a missing path is a DataError naming it), capped per task."""
    records = load_sources(cfg.data, seed=cfg.split_seed, synthetic_per_task=cfg.max_records_per_task or 200)
    if SYNTHETIC in cfg.data:
        log(f"--data {SYNTHETIC}: the generated five-task set, {cfg.max_records_per_task or 200} records per task")
    if cfg.max_records_per_task is None:
        return records
    return first_per_task(records, cfg.max_records_per_task)


def prepare_splits(cfg: TrainConfig, tokenizer, log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Tokenised train and validation examples (the test split is left to the evaluation)."""
    splits = split_records(load_task_records(cfg, log), seed=cfg.split_seed, fold=cfg.fold, num_folds=cfg.num_folds)
    if cfg.max_eval_records_per_task is not None:
        splits["validation"] = first_per_task(splits["validation"], cfg.max_eval_records_per_task)
    out = {}
    for name in ("train", "validation"):
        examples, stats = tokenize_cached(splits[name], tokenizer, cfg.max_length, template=cfg.template,
                                          loss_on=cfg.loss_on, overflow=cfg.overflow, num_proc=cfg.num_proc)
        log(f"{name}: {stats.summary()}")
        if not examples:
            raise ValueError(f"the {name} split is empty after tokenisation (--max_length {cfg.max_length}?)")
        out[name] = examples
    return out
