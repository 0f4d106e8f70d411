"""A HyCAM model's outputs: the model's own output class with HyCAM's three fields added.

`HyCAMCausalLMOutput` and `HyCAMModelOutput` are named here for the two heads most used; any other
head's output class (question answering, classification, Mixtral's MoE output) gets its HyCAM class
from `hycam_output_class`, made once and kept. Every such class pickles through `_rebuild` (its base
class and its fields), so a made class needs no importable name of its own.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

HYCAM_FIELDS = ("balance_loss", "hycam_router_logits", "hycam_router_probs")
"""balance_loss: Eq. 10 over the non-padding tokens of all layers stacked, unweighted (in training mode, but from a
bare backbone, or when asked). hycam_router_logits, hycam_router_probs: `[num_layers, batch, seq_len,
num_specialized]`, the router logits and the Gumbel-softmax probabilities the fusion used (when asked with
`output_hycam_routing=True`)."""


def _with_hycam_fields(base: type, name: str) -> type:
    """`base` (a transformers ModelOutput dataclass) plus HyCAM's fields, each defaulting to None."""
    fields = [(key, torch.Tensor | None, dataclasses.field(default=None)) for key in HYCAM_FIELDS]
    doc = f"{base.__name__} plus HyCAM's {', '.join(HYCAM_FIELDS)} (`hycam.outputs.HYCAM_FIELDS`)."
    namespace = {"__doc__": doc, "__module__": __name__, "__reduce__": _reduce}
    return dataclasses.make_dataclass(name, fields, bases=(base,), namespace=namespace)


def _reduce(output):
    base = type(output).__mro__[1]
    return _rebuild, (base, dict(output))


def _rebuild(base: type, values: dict):
    return hycam_output_class(base)(**values)


HyCAMCausalLMOutput = _with_hycam_fields(CausalLMOutputWithPast, "HyCAMCausalLMOutput")
HyCAMModelOutput = _with_hycam_fields(BaseModelOutputWithPast, "HyCAMModelOutput")
_CLASSES: dict[type, type] = {CausalLMOutputWithPast: HyCAMCausalLMOutput, BaseModelOutputWithPast: HyCAMModelOutput}


def hycam_output_class(base: type) -> type:
    """The HyCAM output class of `base`: a class of its own, since data parallelism and compilers rebuild
    outputs from their class's fields."""
    if base not in _CLASSES:
        _CLASSES[base] = _with_hycam_fields(base, f"HyCAM{base.__name__}")
    return _CLASSES[base]
