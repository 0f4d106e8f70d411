"""RieMoE-LoRA baseline: a mixture of LoRA experts trained with Riemannian-preconditioned gradients.

RieMoE-LoRA (Sun et al. 2025, "A Stronger Mixture of Low-Rank Experts for Fine-Tuning Foundation
Models", code: THUDM/MoELoRA_Riemannian) puts `E` LoRA experts and a token-level softmax router
on every Linear, and trains them with the Riemannian preconditioner of Zhang & Pilanci (2024):
for each expert, `grad_A <- (B^T B + delta I)^-1 grad_A` and `grad_B <- grad_B (A A^T + delta I)^-1`.

Its gate refinement: the gate value `g` scales each expert's output, which distorts the
preconditioned step. The authors' released strategy (`descent_strategy="moe-riemannian"`) keeps the
forward value `g * expert(x)` but lets the expert's parameters see `sqrt(g)` in the backward pass,
while the router still gets the full expert output. `gate_rescale=True` (default) does that.

Every expert runs on every token (dense), so all ranks run the same modules (ZeRO-3 hangs
otherwise); `top_k` only zeroes and renormalises gate values.

The preconditioner has two entry points:
- `register_riemannian_hooks(model)`: gradient hooks that precondition each backward's gradient
  before it is accumulated. The map is linear in the gradient and A, B do not change within an
  optimiser step, so this equals preconditioning the accumulated, data-parallel-averaged gradient.
  It runs before DeepSpeed's own post-accumulation hooks, so it works with `engine.backward(loss)`
  / `engine.step()` under ZeRO 0, 1 and 2, fp32 or bf16, with gradient accumulation.
- `riemannian_precondition_(model)`: rewrites `param.grad` in place between backward and step, once
  per optimiser step. For plain PyTorch loops and DeepSpeed ZeRO 0 (fp32 or bf16; call it at the
  accumulation boundary). ZeRO-1/2 move gradients out of `param.grad` during backward: it raises.
Under ZeRO-3 both raise: parameters and gradients are partitioned, so B^T B cannot be formed locally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from hycam.baselines.adapters import AdapterLinear, apply_adapters, kaiming_uniform_, remove_adapters


class MoELoRALinear(AdapterLinear):
    """`y = W x + (alpha / r) * sum_e g_e(x) * B_e A_e x`, `g(x) = softmax(W_router x)` per token.

    `lora_A: (E, r, in)` Kaiming-uniform, `lora_B: (E, out, r)` zeros (so the model is unchanged at
    init), `router: Linear(in, E)` with the nn.Linear default init (as the authors leave it).

    Args:
        base: the frozen Linear to adapt.
        num_experts: E.
        rank: r, the rank of each expert.
        alpha: expert outputs are scaled by alpha / rank.
        dropout: dropout on the experts' input (the router sees the clean input).
        top_k: keep the k largest gate values per token and renormalise them; None keeps all.
        gate_rescale: the authors' gate refinement (see the module docstring).
    """

    def __init__(
        self, base: nn.Linear, num_experts: int, rank: int, alpha: float, dropout: float = 0.0,
        top_k: int | None = None, gate_rescale: bool = True,
    ) -> None:
        super().__init__(base)
        if num_experts < 1 or rank < 1 or not (top_k is None or 1 <= top_k <= num_experts):
            raise ValueError(f"MoELoRALinear: need num_experts >= 1 (got {num_experts}), rank >= 1 (got {rank}) "
                             f"and top_k None or in 1..num_experts (got {top_k})")
        factory = self.tensor_kwargs()
        self.scaling, self.top_k, self.gate_rescale = alpha / rank, top_k, gate_rescale
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """LoRA's init per expert: A Kaiming-uniform (a = sqrt(5)), B zero."""
        kaiming_uniform_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights `(..., E)`, softmax in at least float32, cast to x's dtype."""
        logits = self.router(x)  # (..., E)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.top_k is not None:
            kept = torch.zeros_like(probs).scatter_(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
            probs = probs * kept / (probs * kept).sum(-1, keepdim=True)
        return probs.to(x.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        experts, out, rank = self.lora_B.shape
        gates = self.gates(x).unsqueeze(-1)  # (..., E, 1)
        down = F.linear(self.dropout(x), self.lora_A.reshape(experts * rank, -1))  # (..., E*r)
        down = down.unflatten(-1, (experts, rank))  # (..., E, r)
        up = self.lora_B.transpose(0, 1).reshape(out, experts * rank)  # (out, E*r): [B_1 | ... | B_E]
        if not self.gate_rescale:
            return F.linear((gates * down).flatten(-2), up) * self.scaling  # (..., out)
        # Same value g * B A x; experts' gradient scaled by sqrt(g), the router's by B A x.
        root = gates.detach().to(torch.promote_types(gates.dtype, torch.float32)).sqrt().to(gates.dtype)
        through_experts = F.linear((root * down).flatten(-2), up)
        through_router = F.linear(((gates - root) * down.detach()).flatten(-2), up.detach())
        return (through_experts + through_router) * self.scaling  # (..., out)


def apply_riemoe(
    model: nn.Module,
    *,
    num_experts: int = 5,
    rank: int = 64,
    alpha: float = 64.0,
    dropout: float = 0.0,
    top_k: int | None = None,
    gate_rescale: bool = True,
    target: Iterable[str] | None = None,
) -> nn.Module:
    """Adds RieMoE-LoRA experts to every Linear of the decoder layers (or those in `target`) in place.

    The backbone is frozen; experts and routers train. Call `register_riemannian_hooks(model)`
    (or `riemannian_precondition_` before each step) for the Riemannian optimisation. Defaults:
    the paper's LoRA rank (64), as many experts as HyCAM has specialized CAMs (5), dense routing;
    the HyCAM paper does not state them (the RieMoE authors use 20 experts of rank 4, top 10).
    """
    def wrap(linear: nn.Linear) -> MoELoRALinear:
        return MoELoRALinear(linear, num_experts, rank, alpha, dropout, top_k, gate_rescale)

    return apply_adapters(model, wrap, target)


def remove_riemoe(model: nn.Module) -> nn.Module:
    """Takes RieMoE-LoRA out: the original Linear modules and requires_grad flags are back."""
    return remove_adapters(model, MoELoRALinear)


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


@torch.no_grad()
def riemannian_precondition_(model: nn.Module, delta: float = 1e-6) -> None:
    """Rewrites the experts' `param.grad` in place; call between backward and `optimizer.step()`.

    With gradient accumulation call it once, at the accumulation boundary (it is not idempotent).
    Under DeepSpeed ZeRO-1/2 use `register_riemannian_hooks` instead (see the module docstring).

    Raises:
        RuntimeError: under ZeRO-3, or if no expert has a gradient in `param.grad`.
    """
    pairs = list(expert_pairs(model).values())
    _refuse_zero3(pairs)
    if all(a.grad is None and b.grad is None for a, b in pairs):
        raise RuntimeError("riemannian_precondition_: no lora_A/lora_B has a .grad; call it after backward. "
                           "DeepSpeed bf16 and ZeRO-1/2 move gradients out of .grad: use register_riemannian_hooks")
    for lora_a, lora_b in pairs:  # each map reads the partner's value, not its gradient: order is free
        if lora_a.grad is not None:
            lora_a.grad.copy_(precondition_grad_a(lora_a.grad, lora_b, delta))
        if lora_b.grad is not None:
            lora_b.grad.copy_(precondition_grad_b(lora_b.grad, lora_a, delta))


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
