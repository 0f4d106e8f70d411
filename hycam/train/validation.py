"""The validation loss: token-level task loss over every rank's share of the validation split.

Every rank runs the same number of forward passes of the same batch size: under ZeRO-3 each forward
gathers parameters from all ranks, so a rank with one batch more would wait forever for the others
(already in the final all_reduce). A rank whose share is short fills it with copies of a record that
count for nothing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hycam.data import collate


@torch.no_grad()
def validation_loss(engine, examples: list[dict], batch_size: int, pad_id: int, rank: int, world: int) -> dict:
    """Token-level task loss on the validation examples, overall and per task, over all ranks."""
    model = engine.module
    was_training = model.training
    model.eval()
    tasks = sorted({e["task"] for e in examples})
    sums = torch.zeros(len(tasks), 2, dtype=torch.float64)  # (task, [nll, tokens])
    mine, real = rank_share(examples, rank, world)
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], pad_id)
        names = batch.pop("task")
        nll, tokens = _summed_nll(model, {k: v.to(engine.device) for k, v in batch.items()})
        for index, (name, value, count) in enumerate(zip(names, nll, tokens), start):
            if index < real:
                sums[tasks.index(name)] += torch.tensor([value, count], dtype=torch.float64)
    dist.all_reduce(sums)
    # Under ZeRO-3 a forward without its backward leaves parameters gathered (kept for a reuse that never
    # comes) or still in flight (prefetched), where the checkpoint's gather after this cannot partition
    # them; release them all. A no-op below stage 3.
    engine.empty_partition_cache()
    model.train(was_training)
    per_task = {t: (s[0] / s[1].clamp_min(1)).item() for t, s in zip(tasks, sums)}
    return {"loss": (sums[:, 0].sum() / sums[:, 1].sum().clamp_min(1)).item(), "tasks": per_task}


def rank_share(examples: list[dict], rank: int, world: int) -> tuple[list[dict], int]:
    """(this rank's records, how many of them are real): every rank gets ceil(n / world) records, the
    real ones `examples[rank::world]` first, then copies of the first record (padding, not counted)."""
    mine = examples[rank::world]
    size = math.ceil(len(examples) / world)
    return mine + examples[:1] * (size - len(mine)), len(mine)


def _summed_nll(model, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    """Per example: the summed next-token NLL of its labelled tokens, and how many there are."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
    return nll.tolist(), (targets != -100).sum(1).tolist()
