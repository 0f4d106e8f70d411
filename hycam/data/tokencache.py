"""Tokenisation of large corpora: ``datasets.map`` over ``num_proc`` processes, cached between runs.

``tokenize_cached`` returns exactly what ``prompts.tokenize_records`` returns (the same examples in
the same order, the same counts). The result is an Arrow file in the cache folder named by a
fingerprint of the records, the tokenizer (``datasets``' own ``Hasher``, which hashes a tokenizer
by its content) and the settings, so a rerun on the same data reads it back instead of tokenising
again, and any change to one of the three tokenises afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Any

from hycam.data.prompts import TokenizeStats, TokenPlan, token_plan, tokenize_with
from hycam.data.records import FIELDS, Record

CACHE_FOLDER = "hycam-tokenized"
"""Subfolder of ``datasets``' cache (``HF_DATASETS_CACHE``) used when no ``cache_dir`` is given."""
_VERSION = "1"  # part of every fingerprint: bump it when the cached columns change meaning


def tokenize_cached(records: Sequence[Record], tokenizer: Any, max_length: int, template: str = "auto",
                    loss_on: str = "response", overflow: str = "truncate", num_proc: int = 1,
                    cache_dir: str | Path | None = None) -> tuple[list[dict], TokenizeStats]:
    """``tokenize_records(records, tokenizer, ...)``, computed in ``num_proc`` processes and cached."""
    import datasets

    plan = token_plan(tokenizer, max_length, template, loss_on, overflow)
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be an int >= 1, got {num_proc!r}")
    if not records:
        return [], TokenizeStats()
    folder = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / CACHE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    key = fingerprint(records, tokenizer, plan)
    table = datasets.Dataset.from_dict({name: [getattr(r, name) for r in records] for name in FIELDS})
    mapped = table.map(_tokenize_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "plan": plan},
                       remove_columns=list(FIELDS), features=_features(), num_proc=num_proc if num_proc > 1 else None,
                       cache_file_name=str(folder / f"{key}.arrow"), new_fingerprint=key, desc="tokenising")
    return _unpack(mapped.to_dict())


def fingerprint(records: Sequence[Record], tokenizer: Any, plan: TokenPlan) -> str:
    """32 hex digits naming the tokenised result of ``records`` under ``tokenizer`` and ``plan``."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256(f"hycam-tokens:{_VERSION}\x1e{Hasher.hash(tokenizer)}\x1e{astuple(plan)!r}".encode())
    for record in records:
        digest.update(("\x1f".join(getattr(record, name) for name in FIELDS) + "\x1e").encode("utf-8"))
    # 32 digits: datasets appends a "_00000_of_00002" shard suffix and refuses fingerprints over 64 chars
    return digest.hexdigest()[:32]


def _features():
    """The cached columns' types, given so that a batch of skipped records (empty lists) types the same."""
    import datasets

    ids = datasets.Sequence(datasets.Value("int64"))
    mask = datasets.Sequence(datasets.Value("int8"))
    text = datasets.Value("string")
    return datasets.Features({"input_ids": ids, "labels": ids, "attention_mask": mask, "task": text, "outcome": text})


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, plan: TokenPlan) -> dict[str, list]:
    """One map batch: a row per record, a skipped record as empty lists with outcome "skipped"."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": [], "task": [], "outcome": []}
    for values in zip(*(batch[name] for name in FIELDS)):
        record = Record(*values)
        example, outcome = tokenize_with(record, tokenizer, plan)
        example = example or {"input_ids": [], "labels": [], "attention_mask": [], "task": record.task}
        for name in ("input_ids", "labels", "attention_mask", "task"):
            out[name].append(example[name])
        out["outcome"].append(outcome)
    return out


def _unpack(columns: dict[str, list]) -> tuple[list[dict], TokenizeStats]:
    examples, stats = [], TokenizeStats()
    for ids, labels, mask, task, outcome in zip(columns["input_ids"], columns["labels"], columns["attention_mask"],
                                                columns["task"], columns["outcome"]):
        getattr(stats, outcome)[task] += 1
        if outcome != "skipped":
            examples.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "task": task})
    return examples, stats
