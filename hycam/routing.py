"""Gumbel-softmax routing (Eq. 9) and the global load-balancing loss (Eq. 10)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gumbel_route(logits: torch.Tensor, tau: float, noise: bool, hard: bool) -> torch.Tensor:
    """Routing probabilities p = softmax((logits + g) / tau), g ~ Gumbel(0, 1), in float32 or wider.

    `hard` returns the one-hot argmax in the forward pass with the soft gradient (straight-through),
    as the authors' `F.gumbel_softmax(..., hard=True)` does.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if noise:
        # -log(Exponential(1)) is Gumbel(0, 1) and never takes the log of zero.
        logits = logits - torch.empty_like(logits).exponential_().log()
    probs = torch.softmax(logits / tau, dim=-1)
    if not hard:
        return probs
    one_hot = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
    return one_hot - probs.detach() + probs


def load_balancing_loss(
    router_logits: torch.Tensor,
    router_probs: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    global_batch: bool = False,
) -> torch.Tensor:
    """L_balance = sum_k mean_b(p[b, k]) * mean_b(softmax(logits)[b, k]), Eq. 10.

    Args:
        router_logits: `[num_layers, batch, seq_len, N_s]`, every layer stacked: the mean runs over
            all layers' tokens together, as the authors' `calculate_load_balancing_loss` does.
        router_probs: the Gumbel-softmax probabilities of the same shape.
        attention_mask: `[batch, seq_len]`, 0 marks padding, which does not count in the means.
        global_batch: take the means over the tokens of every data-parallel rank.

    Returns:
        A scalar in float32 (or the inputs' wider type).
    """
    num_experts = router_logits.size(-1)
    dtype = torch.promote_types(router_logits.dtype, torch.float32)
    soft = F.softmax(router_logits.to(dtype), dim=-1).reshape(-1, num_experts)
    probs = router_probs.to(dtype).reshape(-1, num_experts)
    if attention_mask is None:
        weight = soft.new_ones(soft.size(0), 1)
    else:
        mask = attention_mask.to(soft.dtype).expand(router_logits.shape[:-1])
        weight = mask.reshape(-1, 1)
    sums = torch.stack([(probs * weight).sum(0), (soft * weight).sum(0)])  # (2, N_s)
    count = weight.sum()
    if global_batch and dist.is_available() and dist.is_initialized():
        sums, count = _all_ranks_sum(sums), _all_ranks_sum(count)
    mean_probs, mean_soft = sums / count.clamp_min(1.0)
    return (mean_probs * mean_soft).sum()


def _all_ranks_sum(local: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. Its value is the global sum; its gradient flows to the local term, scaled by
    the world size so that data parallelism's gradient averaging yields the global loss's gradient."""
    total = local.detach().clone()
    dist.all_reduce(total)
    return total + dist.get_world_size() * (local - local.detach())

