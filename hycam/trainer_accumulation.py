"""transformers' Trainer tells HyCAM its gradient accumulation.

Trainer (and TRL's trainers, built on it) counts the forwards of an optimiser step itself and sets
accelerate's shared count to 1, and its loss paths that compute the task loss outside the model (label
smoothing, `compute_loss_func`, TRL's fused LM head) give the model no `num_items_in_batch` with its labels:
the model has no way to know how many forwards share a step. This callback, which HyCAM adds to every
Trainer's default callbacks, declares `args.gradient_accumulation_steps` to the HyCAM model a Trainer trains,
for the length of `train()`, as `hycam.set_gradient_accumulation` would.
"""

from __future__ import annotations

from torch import nn
from transformers.trainer_callback import TrainerCallback


class GradientAccumulationCallback(TrainerCallback):
    """Declares the Trainer's `gradient_accumulation_steps` to its model's HyCAM while it trains."""

    def __init__(self) -> None:
        self.declared = None  # (the model's forward record, what it held before), while training

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        record = forward_record(model) if model is not None else None
        if record is not None:
            self.declared = record, record.accumulation_steps
            record.accumulation_steps = args.gradient_accumulation_steps

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.declared is not None:
            record, before = self.declared
            record.accumulation_steps, self.declared = before, None


def forward_record(model: nn.Module):
    """The `hycam.balance.ForwardRecord` (not imported: balance imports this module) of `model` or of the model it wraps (a PeftModel's), or None."""
    return next((vars(m)["hycam_record"] for m in model.modules() if "hycam_record" in vars(m)), None)


def register() -> None:
    """Adds the callback to Trainer's default callbacks, once. `hycam.apply` calls it: a Trainer built after
    that, whenever its module was imported, has it."""
    try:
        from transformers import trainer
    except (ImportError, RuntimeError):  # transformers' lazy import wraps a missing dependency in RuntimeError
        return
    if GradientAccumulationCallback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(GradientAccumulationCallback)
