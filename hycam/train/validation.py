"""The validation loss: token-level task loss over every rank's share of the validation split."""

from __future__ import annotations

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
    mine = examples[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], pad_id)
        names = batch.pop("task")
        nll, tokens = _summed_nll(model, {k: v.to(engine.device) for k, v in batch.items()})
        for name, value, count in zip(names, nll, tokens):
            sums[tasks.index(name)] += torch.tensor([value, count], dtype=torch.float64)
    dist.all_reduce(sums)
    model.train(was_training)
    per_task = {t: (s[0] / s[1].clamp_min(1)).item() for t, s in zip(tasks, sums)}
    return {"loss": (sums[:, 0].sum() / sums[:, 1].sum().clamp_min(1)).item(), "tasks": per_task}


def _summed_nll(model, batch: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    """Per example: the summed next-token NLL of its labelled tokens, and how many there are."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
    return nll.tolist(), (targets != -100).sum(1).tolist()
