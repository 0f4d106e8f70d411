"""What the paper's PEFT baselines share: wrap every nn.Linear of the decoder layers.

Multi LoRA (`hycam.baselines.multilora`) and RieMoE-LoRA (`hycam.baselines.riemoe`) both replace a frozen `nn.Linear`
by a module that computes `base(x) + delta(x)`, keeping the original Linear object as `.base`.
Trainable parameters are found by module type (every parameter of an `AdapterLinear` that is not its
base's), never by name substrings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hycam.inject import decoder_layers, is_applied


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` (kept as `.base`) plus a trainable update `delta(x)`.

    Sizes come from `base.in_features` / `base.out_features`, not from `base.weight.shape`, which
    is empty under ZeRO-3; new tensors take the base weight's dtype and device.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__}: base must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    def tensor_kwargs(self) -> dict:
        """Keyword arguments for new tensors: the base weight's dtype and device."""
        return {"dtype": self.base.weight.dtype, "device": self.base.weight.device}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)


def kaiming_uniform_(stacked: torch.Tensor) -> None:
    """`nn.init.kaiming_uniform_(w, a=sqrt(5))` on each `w = stacked[i]` (the nn.Linear default).

    Called on the stacked `(n, rows, fan_in)` tensor directly, torch would take `rows * fan_in`
    as the fan-in; for a = sqrt(5) the bound reduces to 1 / sqrt(fan_in).
    """
    bound = 1.0 / math.sqrt(stacked.size(-1))
    with torch.no_grad():
        stacked.uniform_(-bound, bound)


def apply_adapters(model: nn.Module, wrap: Callable[[nn.Linear], AdapterLinear]) -> nn.Module:
    """Wraps every nn.Linear of the decoder layers with `wrap`, freezes the rest of the model.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral or laid out like them).
        wrap: builds the adapter module around one Linear.

    Raises:
        ValueError: the model already has a baseline or HyCAM, or its decoder layers hold no Linear.
    """
    if any(isinstance(m, AdapterLinear) for m in model.modules()) or is_applied(model):
        raise ValueError(f"{type(model).__name__} already has adapters (a baseline or HyCAM); remove them first")
    found = _decoder_linears(model)
    model.requires_grad_(False)
    for parent, child, linear in found:
        setattr(parent, child, wrap(linear))
    for param in adapter_parameters(model).values():
        param.requires_grad_(True)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter a baseline adds, by its name in `model`: what the optimiser should train."""
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            base = {id(p) for p in module.base.parameters()}
            own = module.named_parameters(prefix=prefix)
            found.update((name, p) for name, p in own if id(p) not in base)
    return found


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, Linear) for each Linear to wrap, collected before any is replaced."""
    found = []
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            parent_name, _, child = name.rpartition(".")
            if isinstance(module, nn.Linear):
                found.append((layer.get_submodule(parent_name), child, module))
    if not found:
        raise ValueError(f"{type(model).__name__}: the decoder layers contain no nn.Linear to adapt")
    return found
