"""RieMoE-LoRA baseline: a mixture of LoRA experts trained with Riemannian-preconditioned gradients.

RieMoE-LoRA (Sun et al. 2025, "A Stronger Mixture of Low-Rank Experts for Fine-Tuning Foundation
Models", code: THUDM/MoELoRA_Riemannian) puts `E` LoRA experts and a token-level softmax router
on every Linear, and trains them with the Riemannian preconditioner of Zhang & Pilanci (2024):
for each expert, `grad_A <- (B^T B + delta I)^-1 grad_A` and `grad_B <- grad_B (A A^T + delta I)^-1`.

Its gate refinement: the gate value `g` scales each expert's output, which distorts the
preconditioned step. The authors' released strategy (`descent_strategy="moe-riemannian"`) keeps the
forward value `g * expert(x)` but lets the expert's parameters see `sqrt(g)` in the backward pass,
while the router still gets the full expert output. This module does that.

Every expert runs on every token (dense), so all ranks run the same modules (ZeRO-3 hangs otherwise).

The preconditioner, `register_riemannian_hooks(model)`: gradient hooks that precondition each
backward's gradient before it is accumulated. The map is linear in the gradient and A, B do not change
within an optimiser step, so this equals preconditioning the accumulated, data-parallel-averaged
gradient. It runs before DeepSpeed's own post-accumulation hooks, so it works with
`engine.backward(loss)` / `engine.step()` under ZeRO 0, 1 and 2, fp32 or bf16, with gradient
accumulation. Under ZeRO-3 it raises: parameters and gradients are partitioned, so B^T B cannot be
formed locally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from hycam.baselines.adapters import AdapterLinear, apply_adapters, kaiming_uniform_


class MoELoRALinear(AdapterLinear):
    """`y = W x + (alpha / r) * sum_e g_e(x) * B_e A_e x`, `g(x) = softmax(W_router x)` per token.

    `lora_A: (E, r, in)` Kaiming-uniform, `lora_B: (E, out, r)` zeros (so the model is unchanged at
    init), `router: Linear(in, E)` with the nn.Linear default init (as the authors leave it).

    Args:
        base: the frozen Linear to adapt.
        num_experts: E.
        rank: r, the rank of each expert.
        alpha: expert outputs are scaled by alpha / rank.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float) -> None:
        super().__init__(base)
        if num_experts < 1 or rank < 1:
            raise ValueError(f"MoELoRALinear: need num_experts >= 1 (got {num_experts}) and rank >= 1 (got {rank})")
        factory = self.tensor_kwargs()
        self.scaling = alpha / rank
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """LoRA's init per expert: A Kaiming-uniform (a = sqrt(5)), B zero."""
        kaiming_uniform_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights `(..., E)`, softmax in at least float32, cast to x's dtype."""
        logits = self.router(x)  # (..., E)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return probs.to(x.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        experts, out, rank = self.lora_B.shape
        gates = self.gates(x).unsqueeze(-1)  # (..., E, 1)
        down = F.linear(x, self.lora_A.reshape(experts * rank, -1))  # (..., E*r)
        down = down.unflatten(-1, (experts, rank))  # (..., E, r)
        up = self.lora_B.transpose(0, 1).reshape(out, experts * rank)  # (out, E*r): [B_1 | ... | B_E]
        # Same value g * B A x; experts' gradient scaled by sqrt(g), the router's by B A x.
        root = gates.detach().to(torch.promote_types(gates.dtype, torch.float32)).sqrt().to(gates.dtype)
        through_experts = F.linear((root * down).flatten(-2), up)
        through_router = F.linear(((gates - root) * down.detach()).flatten(-2), up.detach())
        return (through_experts + through_router) * self.scaling  # (..., out)


def apply_riemoe(model: nn.Module, *, num_experts: int = 5, rank: int = 64, alpha: float = 64.0) -> nn.Module:
    """Adds RieMoE-LoRA experts to every Linear of the decoder layers in place.

    The backbone is frozen; experts and routers train. Call `register_riemannian_hooks(model)` for the
    Riemannian optimisation. Defaults: the paper's LoRA rank (64), as many experts as HyCAM has
    specialized CAMs (5), dense routing; the HyCAM paper does not state them (the RieMoE authors use
    20 experts of rank 4, top 10).
    """
    return apply_adapters(model, lambda linear: MoELoRALinear(linear, num_experts, rank, alpha))


def precondition_grad_a(grad_a: torch.Tensor, lora_b: torch.Tensor, delta: float) -> torch.Tensor:
    """`(B_e^T B_e + delta I)^-1 grad_A_e` for every expert e; `grad_a: (E, r, in)`, `lora_b: (E, out, r)`."""
    dtype = torch.promote_types(grad_a.dtype, torch.float32)
    b = lora_b.detach().to(dtype)
    gram = b.transpose(1, 2) @ b + delta * torch.eye(b.size(-1), dtype=dtype, device=b.device)  # (E, r, r)
    return torch.linalg.solve(gram, grad_a.to(dtype)).to(grad_a.dtype)


def precondition_grad_b(grad_b: torch.Tensor, lora_a: torch.Tensor, delta: float) -> torch.Tensor:
    """`grad_B_e (A_e A_e^T + delta I)^-1` for every expert e; `grad_b: (E, out, r)`, `lora_a: (E, r, in)`."""
    dtype = torch.promote_types(grad_b.dtype, torch.float32)
    a = lora_a.detach().to(dtype)
    gram = a @ a.transpose(1, 2) + delta * torch.eye(a.size(1), dtype=dtype, device=a.device)  # (E, r, r)
    # The Gram matrix is symmetric, so X = G M^-1 is the transpose of M^-1 G^T.
    return torch.linalg.solve(gram, grad_b.to(dtype).transpose(1, 2)).transpose(1, 2).to(grad_b.dtype)


def expert_pairs(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """`{module name: (lora_A, lora_B)}` for every MoELoRALinear, each pair looked up by its two
    parameter names, so parameter order (which optimisers and ZeRO may change) never matters."""
    params = dict(model.named_parameters())
    prefixes = [name for name, module in model.named_modules() if isinstance(module, MoELoRALinear)]
    if not prefixes:
        raise ValueError(f"{type(model).__name__} has no MoELoRALinear: call apply_riemoe(model) first")
    return {p: (params[_join(p, "lora_A")], params[_join(p, "lora_B")]) for p in prefixes}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def register_riemannian_hooks(model: nn.Module, delta: float = 1e-6) -> list[RemovableHandle]:
    """Preconditions every expert gradient as backward produces it; returns the hook handles.

    Register once, after `apply_riemoe` (before or after `deepspeed.initialize`); hooks do not
    survive `copy.deepcopy`, so register on the copy that trains. Remove with `h.remove()` per handle.
    """
    handles = []
    for lora_a, lora_b in expert_pairs(model).values():
        handles.append(lora_a.register_hook(_hook(precondition_grad_a, lora_a, lora_b, delta)))
        handles.append(lora_b.register_hook(_hook(precondition_grad_b, lora_b, lora_a, delta)))
    return handles


def _hook(precondition, param: nn.Parameter, partner: nn.Parameter, delta: float):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        _refuse_zero3([(param, partner)])  # ZeRO-3 converts parameters after the hooks are registered
        return precondition(grad, partner, delta)

    return hook


def _refuse_zero3(pairs: Iterable[tuple[nn.Parameter, nn.Parameter]]) -> None:
    if any(hasattr(p, "ds_id") for pair in pairs for p in pair):
        raise RuntimeError("RieMoE-LoRA's Riemannian preconditioner does not support DeepSpeed ZeRO-3: lora_A and "
                           "lora_B are partitioned across ranks, so B^T B and A A^T cannot be formed; use ZeRO 0-2")
