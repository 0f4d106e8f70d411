"""Activation checkpointing of a HyCAM model's decoder layers, the one kind under which its router trains."""

from __future__ import annotations

from torch import nn


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of the decoder layers, non-reentrant (reentrant checkpointing runs the forward
    under no_grad, so the balance loss would give the router no gradient), through whichever name this
    transformers has: activation_checkpointing_enable (5.x) or gradient_checkpointing_enable (4.x, deprecated in 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
