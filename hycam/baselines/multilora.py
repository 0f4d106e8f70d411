"""Multi LoRA baseline: several LoRA adapters in parallel on every decoder Linear.

MultiLoRA (Wang et al. 2023, "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning")
scales LoRA horizontally, `n` adapters side by side, and changes the initialisation so that no
adapter starts from a zero `B`: both `A_i` and `B_i` are Kaiming-uniform and a learnable
scaling factor `s_i`, initialised to zero, keeps the model unchanged at step 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hycam.baselines.adapters import AdapterLinear, apply_adapters, kaiming_uniform_


class MultiLoRALinear(AdapterLinear):
    """`y = W x + (alpha / r) * sum_i s_i * (B_i A_i x)`, all `n` adapters in two matmuls.

    `s_i` is a vector over output features (element-wise, as in the public MultiLoRA code; a
    scalar per adapter is its special case). `A_i: r x in`, `B_i: out x r`, stacked as
    `lora_A: (n, r, in)`, `lora_B: (n, out, r)`, `lora_scale: (n, out)`.

    Args:
        base: the frozen Linear to adapt.
        num_adapters: n, the number of parallel adapters.
        rank: r, the rank of each adapter.
        alpha: the update is scaled by alpha / rank.
    """

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int, alpha: float) -> None:
        super().__init__(base)
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"MultiLoRALinear: num_adapters={num_adapters} and rank={rank} must be >= 1")
        factory = self.tensor_kwargs()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_adapters, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_adapters, self.out_features, rank, **factory))
        self.lora_scale = nn.Parameter(torch.empty(num_adapters, self.out_features, **factory))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """MultiLoRA's init: A_i and B_i Kaiming-uniform (a = sqrt(5)), s_i zero."""
        kaiming_uniform_(self.lora_A)
        kaiming_uniform_(self.lora_B)
        nn.init.zeros_(self.lora_scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        n, out, rank = self.lora_B.shape
        down = F.linear(x, self.lora_A.reshape(n * rank, -1))  # (..., n*r)
        scaled_b = self.lora_B * self.lora_scale.unsqueeze(-1)  # (n, out, r): s_i * B_i row-wise
        up = scaled_b.transpose(0, 1).reshape(out, n * rank)  # (out, n*r): [s_1 B_1 | ... | s_n B_n]
        return F.linear(down, up) * self.scaling  # (..., out)


def apply_multilora(model: nn.Module, *, num_adapters: int = 5, rank: int = 64, alpha: float = 64.0) -> nn.Module:
    """Adds Multi LoRA to every Linear of the decoder layers in place.

    The backbone is frozen; only the adapters train. Defaults: the paper's LoRA rank (64), as many
    adapters as HyCAM has specialized CAMs (5), alpha = rank; the paper does not state its values.
    """
    return apply_adapters(model, lambda linear: MultiLoRALinear(linear, num_adapters, rank, alpha))
