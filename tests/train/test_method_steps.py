"""Each method trains exactly the parameters it declares: a few plain AdamW steps on a tiny model
change those and nothing else (test_train checks HyCAM the same way through DeepSpeed, end to end)."""

import pytest
import torch
from conftest import padded_batch, tiny_model

from hycam.baselines import methods

pytestmark = pytest.mark.fast

OPTIONS = methods.MethodOptions(rank=8, num_specialized=3)


def task_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


@torch.no_grad()
def eval_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The task loss without routing noise."""
    model.eval()
    loss = task_loss(model, batch).item()
    model.train()
    return loss


@pytest.mark.parametrize("method", methods.METHODS)
def test_a_few_steps_lower_the_loss_and_change_exactly_the_trainable_parameters(method):
    model = methods.prepare(tiny_model("llama"), method, OPTIONS).train()
    trainable = methods.trainable(model, method)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3 if method == "full" else 2e-2, weight_decay=0.0)
    batch = padded_batch()
    first = eval_loss(model, batch)
    torch.manual_seed(0)
    for _ in range(3):  # the zero-initialised up-projections hold back their down-projections' first gradient
        optimizer.zero_grad()
        task_loss(model, batch).backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == set(trainable)
    assert eval_loss(model, batch) < first
