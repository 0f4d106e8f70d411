"""The one patch on the model's forward: stack every router's output and add the balance loss.

Router outputs are collected in a list that exists only for the duration of one call (a context
variable set and reset around it), so a forward recomputed during backward (gradient checkpointing)
is never counted twice. Unlike per-call forward hooks, this costs nothing per module: registering
hooks meant walking every module of the model on every call, 3 % of a decoding step of SmolLM2.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from hycam.routing import load_balancing_loss

_RECORDS: ContextVar[list | None] = ContextVar("hycam_router_records", default=None)


def record_routing(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """Every router calls this; it keeps the outputs while a HyCAM model's forward is running."""
    records = _RECORDS.get()
    if records is not None:
        records.append((logits, probs))


@dataclass
class HyCAMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what HyCAM's routers did.

    Args:
        loss: task loss + balance_coef * balance_loss, when labels were given.
        task_loss: the model's own next-token cross-entropy.
        balance_loss: Eq. 10 over the non-padding tokens of all layers stacked together.
        router_logits: `[num_layers, batch, seq_len, num_specialized]`.
        router_probs: the Gumbel-softmax probabilities used in the fusion, same shape.
    """

    task_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    router_probs: torch.FloatTensor | None = None


@functools.cache
def routed_forward_for(model_class: type):
    """A forward for `model_class` that keeps its signature (generation inspects it)."""

    @functools.wraps(model_class.forward)
    def forward(self, *args, **kwargs):
        records: list[tuple[torch.Tensor, torch.Tensor]] = []
        token = _RECORDS.set(records)
        try:
            output = model_class.forward(self, *args, **kwargs)
        finally:
            _RECORDS.reset(token)
        # Every causal LM in transformers takes (input_ids, attention_mask, ...) in this order.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return _with_routing(self, output, records, mask)

    return forward


def _with_routing(model, output, records, attention_mask) -> HyCAMCausalLMOutput:
    if not isinstance(output, ModelOutput):
        raise TypeError("HyCAM needs the model to return a ModelOutput: do not pass return_dict=False")
    config = model.hycam_config
    task_loss, fields = output.get("loss"), dict(output)
    if not records:  # shared CAM only: nothing is routed
        balance = torch.zeros((), device=output["logits"].device)
        return HyCAMCausalLMOutput(**fields, task_loss=task_loss, balance_loss=balance)
    logits = torch.stack([r[0] for r in records])  # (num_layers, B, L, N_s)
    probs = torch.stack([r[1] for r in records])  # (num_layers, B, L, N_s)
    _check_router_gradient(model, logits)
    mask = _token_mask(attention_mask, logits.size(-2))
    # Global means need every rank in the same call: only training guarantees that (not generation).
    global_batch = config.balance_scope == "global" and model.training
    balance = load_balancing_loss(logits, probs, mask, global_batch=global_batch)
    if task_loss is not None:
        fields["loss"] = task_loss + config.balance_coef * balance
    return HyCAMCausalLMOutput(
        **fields, task_loss=task_loss, balance_loss=balance, router_logits=logits, router_probs=probs
    )


def _token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The `[batch, seq_len]` padding mask of this call's tokens (with a KV cache, the last ones)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


def _check_router_gradient(model, logits: torch.Tensor) -> None:
    # Reentrant checkpointing runs the forward under no_grad: the stacked logits would carry no
    # gradient and the balance loss would silently train nothing.
    router_trains = model.hycam_config.train_router and model.training and torch.is_grad_enabled()
    if router_trains and not logits.requires_grad:
        raise RuntimeError(
            "HyCAM router outputs carry no gradient, so the balance loss cannot train the router. Enable "
            "checkpointing with hycam.enable_checkpointing(model), or pass {'use_reentrant': False} to the "
            "model's activation_checkpointing_enable (gradient_checkpointing_enable before transformers 5)."
        )


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers, non-reentrant (the only kind HyCAM's router trains
    under), through whichever name this transformers has: activation_checkpointing_enable (5.x) or
    gradient_checkpointing_enable (4.x, deprecated in 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
