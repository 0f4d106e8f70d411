"""sum_k p_k * SiLU(x_k B_k^T + b_k): the specialized half of Eq. 11, all experts batched.

Autograd would keep two `[N_s, tokens, d]` tensors per layer for the backward pass (the
pre-activation and its SiLU), N_s times the size of the attention output. This function keeps only
its inputs (`[tokens, N_s, r]` and the probabilities) and recomputes the up-projection in backward:
one extra batched matmul instead of the memory.
"""

from __future__ import annotations

import torch


def weighted_silu_sum(
    x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor
) -> torch.Tensor:
    """x (..., N_s, r), up (N_s, d, r), bias (N_s, d) or None, probs (..., N_s) -> (..., d)."""
    lead = x.shape[:-2]
    out = _WeightedSiluSum.apply(x.reshape(-1, *x.shape[-2:]), up, bias, probs.reshape(-1, probs.size(-1)))
    return out.reshape(*lead, up.size(1))


def _pre_activation(x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    pre = torch.bmm(x.transpose(0, 1), up.transpose(1, 2))  # (N_s, T, d)
    return pre if bias is None else pre + bias.unsqueeze(1)


class _WeightedSiluSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, bias, probs):  # x (T, N_s, r), probs (T, N_s)
        ctx.save_for_backward(x, up, bias, probs)
        act = torch.nn.functional.silu(_pre_activation(x, up, bias))  # (N_s, T, d)
        return torch.einsum("ntd,tn->td", act, probs)  # (T, d)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (T, d)
        x, up, bias, probs = ctx.saved_tensors
        pre = _pre_activation(x, up, bias)  # (N_s, T, d), recomputed
        sig = torch.sigmoid(pre)
        grad_probs = None
        if ctx.needs_input_grad[3]:
            grad_probs = torch.einsum("ntd,td->tn", pre * sig, grad_out)
        # d SiLU(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
        grad_pre = sig.mul_(1 + pre * (1 - sig)).mul_(grad_out.unsqueeze(0) * probs.t().unsqueeze(-1))
        grad_x = torch.bmm(grad_pre, up).transpose(0, 1) if ctx.needs_input_grad[0] else None
        grad_up = torch.bmm(grad_pre.transpose(1, 2), x.transpose(0, 1)) if ctx.needs_input_grad[1] else None
        grad_bias = grad_pre.sum(1) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_up, grad_bias, grad_probs
