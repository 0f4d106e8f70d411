"""HyCAM's forward in fewer passes over memory: the values of `HyCAM.reference_forward`, computed faster.

What measurably pays (docs/PERFORMANCE.md), and nothing else:

- sum_k p_k SiLU(x_k B_k^T + b_k) as one autograd Function. Autograd would keep two `[N_s, tokens, d]`
  tensors per layer for backward (the pre-activation and its SiLU), N_s times the size of the attention
  output; the Function keeps only its inputs and recomputes the up-projection in backward.
- The `[N_s, tokens, d]` intermediates live in reused scratch memory on CPU, updated in place, and the
  backward uses aten's fused `silu_backward`: the fewest passes over that memory found.
- Without grad (evaluation, decoding), the Function's own forward runs directly, and the shared CAM's
  SiLU and the final sum are written in place.

The experts stay expert-major (`[N_s, tokens, r]`) from the down-projection to the weighted sum, so that
every batched matmul reads contiguous memory.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn


def forward(cam: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`cam.reference_forward(h)` of a `hycam.cam.HyCAM` (not imported: it imports this module):
    h_norm (..., d) -> (A_fusion (..., d), logits, probs (..., N_s) or None)."""
    tokens = h.reshape(-1, h.size(-1))  # (T, d)
    shared = spec_input = logits = None
    if cam.W_in is not None:  # one matmul for W_shared (or A_shared), A_1..A_N and W_router
        rows = [cam.shared_rows, cam.spec_rows, cam.router_rows]
        shared, spec_input, logits = F.linear(tokens, cam.W_in).split(rows, dim=-1)
    shared = _shared_pre_activation(cam, shared)  # (T, d) or None
    if not cam.num_specialized:
        return F.silu(shared).view(h.shape), None, None
    logits = _router_logits(cam, tokens, logits).view(*h.shape[:-1], cam.num_specialized)  # (..., N_s)
    probs = cam.route(logits)  # (..., N_s)
    x = _expert_inputs(cam, tokens, spec_input)  # (T, N_s, r or d)
    spec = weighted_silu_sum(x, cam.B, cam.b_spec, probs.reshape(-1, cam.num_specialized))  # (T, d)
    if shared is None:
        return spec.view(h.shape), logits, probs
    if torch.is_grad_enabled():
        return (spec + F.silu(shared)).view(h.shape), logits, probs
    return spec.add_(F.silu(shared, inplace=True)).view(h.shape), logits, probs


def _router_logits(cam: nn.Module, tokens: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """h W_router^T + b_router (T, N_s), from W_in's product, or from a frozen router's own weight."""
    if x is None or not cam.router_rows:
        return F.linear(tokens, cam.W_router, cam.b_router)
    return x if cam.b_router is None else x + cam.b_router


def _shared_pre_activation(cam: nn.Module, x: torch.Tensor | None) -> torch.Tensor | None:
    """h W_shared^T + b_shared (T, d) from h W_shared^T, or from h A_shared^T (T, r_s) under InversePEFT."""
    if x is None or not cam.shared_rows:
        return None
    if cam.B_shared is not None:
        return F.linear(F.linear(x, cam.N_shared), cam.B_shared, cam.b_shared)
    return x if cam.b_shared is None else x + cam.b_shared


def _expert_inputs(cam: nn.Module, tokens: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    """s h A_k^T N_k^T (T, N_s, r) as a view of an expert-major tensor; h itself (expanded) for full-rank experts."""
    n = cam.num_specialized
    if a is None or not cam.spec_rows:
        return tokens.unsqueeze(1).expand(tokens.size(0), n, tokens.size(1))  # (T, N_s, d), no copy
    x = torch.bmm(a.reshape(-1, n, cam.rank).transpose(0, 1), cam.N.transpose(1, 2))  # (N_s, T, r)
    x = x if cam.scale == 1.0 else x * cam.scale
    return x.transpose(0, 1)  # (T, N_s, r)


def weighted_silu_sum(
    x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor
) -> torch.Tensor:
    """sum_k p_k SiLU(x_k B_k^T + b_k), (T, d).

    x (T, N_s, r), best a view of an expert-major tensor; up (N_s, d, r); bias (N_s, d) or None; probs (T, N_s).
    """
    # One dtype throughout, x's: under autocast x comes from a low-precision matmul while up stays float32.
    up, bias, probs = (t if t is None else t.to(x.dtype) for t in (up, bias, probs))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, up, bias, probs)):
        return _WeightedSiluSum.apply(x, up, bias, probs)
    return _weighted_silu_sum(x, up, bias, probs)  # the same arithmetic without the Function's overhead per call


_scratch = threading.local()


def _workspace(slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reused scratch tensor `[N_s, T, d]` for intermediates that never leave this module.

    On CPU a fresh multi-megabyte tensor costs a page fault per 4 KiB on first touch, more than the
    arithmetic done on it; a decoding step's few kilobytes (T <= 16) come fresh at no cost, and CUDA's
    caching allocator already reuses memory.
    """
    if like.device.type != "cpu" or shape[1] <= 16:
        return like.new_empty(shape)
    buffers = vars(_scratch).setdefault("buffers", {})
    numel, key = math.prod(shape), (slot, like.dtype)
    if key not in buffers or buffers[key].numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffers[key] = like.new_empty(numel)
    return buffers[key][:numel].view(shape)


def release_workspace() -> None:
    """Frees this thread's scratch memory (`hycam.remove` calls it); the next call allocates it again."""
    vars(_scratch).pop("buffers", None)


def _pre_activation(x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, N_s, r) -> x_k B_k^T + b_k, (N_s, T, d), in scratch slot 0."""
    x_t, up_t = x.transpose(0, 1), up.transpose(1, 2)  # (N_s, T, r), (N_s, r, d)
    out = _workspace(0, (up.size(0), x.size(0), up.size(1)), x)
    return torch.bmm(x_t, up_t, out=out) if bias is None else torch.baddbmm(bias.unsqueeze(1), x_t, up_t, out=out)


def _weighted_silu_sum(x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None,
                       probs: torch.Tensor) -> torch.Tensor:
    act = F.silu(_pre_activation(x, up, bias), inplace=True)  # (N_s, T, d)
    return act.mul_(probs.t().unsqueeze(-1)).sum(0)  # (T, d)


class _WeightedSiluSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, bias, probs):  # x (T, N_s, r), probs (T, N_s)
        ctx.save_for_backward(x, up, bias, probs)
        return _weighted_silu_sum(x, up, bias, probs)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (T, d)
        x, up, bias, probs = ctx.saved_tensors
        pre = _pre_activation(x, up, bias)  # (N_s, T, d), recomputed
        # Two [N_s, T, d] buffers in all, each op in place: fresh CPU memory costs page faults.
        # dL/dA_spec_k = p_k * grad_out, written expert-major (contiguous) as the bmm below wants it.
        grad_pre = torch.mul(grad_out, probs.t().unsqueeze(-1), out=_workspace(1, pre.shape, pre))  # (N_s, T, d)
        torch.ops.aten.silu_backward.grad_input(grad_pre, pre, grad_input=grad_pre)
        need_x, need_up, need_bias, need_probs = ctx.needs_input_grad
        grad_probs = F.silu(pre, inplace=True).mul_(grad_out).sum(-1).t() if need_probs else None  # (T, N_s)
        grad_x = torch.bmm(grad_pre, up).transpose(0, 1) if need_x else None  # (T, N_s, r)
        # (x_k^T grad_pre_k)^T rather than grad_pre_k^T x_k: bf16 matmuls copy a transposed big operand.
        grad_up = torch.bmm(x.permute(1, 2, 0), grad_pre).transpose(1, 2) if need_up else None  # (N_s, d, r)
        grad_bias = grad_pre.sum(1) if bias is not None and need_bias else None
        return grad_x, grad_up, grad_bias, grad_probs
