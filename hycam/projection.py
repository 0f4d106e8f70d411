"""The linear map inside HyCAM's modules, deliberately not an `nn.Linear`.

Tools that adapt "every linear layer" find them by `isinstance(module, nn.Linear)`: peft's
`target_modules="all-linear"` (`peft.tuners.tuners_utils._maybe_include_all_linear_layers`) and
this project's Multi-LoRA and RieMoE baselines. Had HyCAM's projections been `nn.Linear`s, LoRA put
on a HyCAM model would wrap the router (whose forward returns a tuple, which LoRA cannot add to)
and the CAMs, and train adapters of the adapter. The parameter names stay `weight` and `bias`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Module):
    """y = x W^T + b with `nn.Linear`'s attributes, parameter names and default initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`nn.Linear.reset_parameters`: Kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
