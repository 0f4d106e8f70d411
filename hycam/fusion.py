"""sum_k p_k * SiLU(x_k B_k^T + b_k): the specialized half of Eq. 11, all experts batched.

Autograd would keep two `[N_s, tokens, d]` tensors per layer for the backward pass (the
pre-activation and its SiLU), N_s times the size of the attention output. This function keeps only
its inputs (`[tokens, N_s, r]` and the probabilities) and recomputes the up-projection in backward:
one extra batched matmul instead of the memory.

Layout: the experts' matmuls are batched over the expert axis, so `x` is best passed as a view of an
expert-major `[N_s, tokens, r]` tensor (what `LowRankDown` returns); any layout is correct. The
`[N_s, tokens, d]` intermediates live in reused scratch memory and are updated in place, the
probability-weighted sum is a multiply and a sum over the expert axis, and the backward uses aten's
fused `silu_backward`: the fewest passes over that memory found (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


def weighted_silu_sum(
    x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor
) -> torch.Tensor:
    """x (..., N_s, r), up (N_s, d, r), bias (N_s, d) or None, probs (..., N_s) -> (..., d)."""
    lead = x.shape[:-2]
    x, probs = x.reshape(-1, *x.shape[-2:]), probs.reshape(-1, probs.size(-1))  # (T, N_s, r), (T, N_s)
    # One dtype throughout, x's: under autocast x comes from a low-precision matmul while up stays float32.
    up, bias, probs = (t if t is None else t.to(x.dtype) for t in (up, bias, probs))
    if torch.compiler.is_compiling():  # scratch memory is Python state a graph cannot hold; the compiler fuses anyway
        out = _plain(x, up, bias, probs)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, up, bias, probs)):
        out = _WeightedSiluSum.apply(x, up, bias, probs)
    else:  # inference: the same arithmetic without the autograd.Function's overhead per call
        out = _forward(x, up, bias, probs)
    return out.reshape(*lead, up.size(1))


def _plain(x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    pre = torch.einsum("tkr,kdr->tkd", x, up)  # (T, N_s, d)
    pre = pre if bias is None else pre + bias
    return (F.silu(pre) * probs.unsqueeze(-1)).sum(1)  # (T, d)


_scratch = threading.local()


def _workspace(slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reused scratch tensor for the [N_s, T, d] intermediates that never leave this module.

    On CPU a fresh multi-megabyte tensor costs a page fault per 4 KiB on first touch, more than the
    arithmetic done on it; CUDA's caching allocator already reuses memory, so only CPU gets this.
    """
    if like.device.type != "cpu":
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


def _forward(x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    act = F.silu(_pre_activation(x, up, bias), inplace=True)  # (N_s, T, d)
    return act.mul_(probs.t().unsqueeze(-1)).sum(0)  # (T, d)


def modulation_at_inference(shared: torch.Tensor, down: torch.Tensor, probs: torch.Tensor,
                            up: torch.Tensor) -> torch.Tensor:
    """A_fusion without autograd, from the merged matmul's three outputs (`HyCAM` at inference).

    shared = h W_shared^T (..., d), down = h A^T (..., N_s r), probs (..., N_s) float32,
    up = scale * (B_k N_k)^T (N_s, r, d) -> A_fusion (..., d).
    The arithmetic of `weighted_silu_sum` on `LowRankDown`'s output with N_k folded into B_k, in the
    fewest ops found (what counts when decoding one token): the experts stay expert-major from the
    down-projection to the weighted sum, and SiLU, the weighting and the sum are written in place.
    """
    n, r = up.shape[:2]
    x = down.reshape(-1, n, r).transpose(0, 1)  # (N_s, T, r)
    # Scratch memory for prefill's megabytes; a decoding step's few kilobytes come fresh at no cost.
    scratch = _workspace(0, (n, x.size(1), up.size(2)), x) if x.size(1) > 16 else None
    pre = torch.bmm(x, up, out=scratch)  # (N_s, T, d)
    # An in-place multiply by float32 weights rounds once, into pre's dtype.
    act = F.silu(pre, inplace=True).mul_(probs.movedim(-1, 0).reshape(n, -1, 1))  # p_k SiLU(...), (N_s, T, d)
    return act.sum(0).view(shared.shape).add_(F.silu(shared, inplace=True))


class _WeightedSiluSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, bias, probs):  # x (T, N_s, r), probs (T, N_s)
        ctx.save_for_backward(x, up, bias, probs)
        return _forward(x, up, bias, probs)

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
