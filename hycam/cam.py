"""The HyCAM module of one decoder layer: the shared CAM, the specialized CAMs and their router."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hycam import fast
from hycam.config import HyCAMConfig
from hycam.routing import gumbel_route


class HyCAM(nn.Module):
    r"""Hybrid Contextual Attention Modulation of one layer (HyCAM, CIKM 2025, Section 3.3).

    From the attention's input h_norm (B, L, d) it computes the modulation weights

        A_shared   = SiLU(h_norm W_shared^T + b_shared)                                  (Eq. 8)
        A_spec_k   = SiLU(s h_norm A_k^T N_k^T B_k^T + b_spec_k),   k = 1..N_s           (Eq. 8)
        p          = softmax((h_norm W_router^T + b_router + g) / tau),   g ~ Gumbel(0, 1)  (Eq. 9)
        A_fusion   = A_shared + sum_k p_k A_spec_k                                        (Eq. 11)

    which the caller applies to the attention's output: h_out = h_att + h_att * A_fusion. The
    specialized CAMs are SLoRA-shaped, W_k = B_k N_k A_k of rank r; with `rank=None` they are full
    d x d matrices, W_k = B_k. InversePEFT (`shared_rank`) makes the shared CAM low rank instead:
    W_shared = B_shared N_shared A_shared. s = lora_alpha / r when `lora_alpha` is set, else 1.

    The matrices that read h_norm and train are one parameter, `W_in`: the rows of W_shared (or
    A_shared), then A_1..A_N, then W_router. One matmul reads h_norm for all of them, which is what a
    decoding step of one token spends its time on. A router that does not train (`train_router=False`,
    the authors' code) is a parameter of its own, `W_router`: one parameter has one `requires_grad`.

    Args:
        hidden_size: d, the model's `config.hidden_size` (under ZeRO-3 weight shapes are empty).
        config: which CAMs exist, their ranks and the routing.
        **factory: `device` and `dtype` of the parameters.
    """

    def __init__(self, hidden_size: int, config: HyCAMConfig, **factory) -> None:
        super().__init__()
        d, n, r, r_s = hidden_size, config.num_specialized, config.rank, config.shared_rank
        self.num_specialized, self.rank = n, r
        self.shared_rows = (r_s or d) if config.shared else 0
        self.spec_rows = n * r if n and r else 0
        self.router_rows = n if config.train_router else 0
        self.tau, self.hard, self.eval_noise = config.tau, config.hard_routing, config.eval_noise
        self.scale = config.lora_alpha / r if config.lora_alpha else 1.0
        self.init_std = config.init_std
        low_rank_shared, bias = config.shared and r_s is not None, config.bias
        rows = self.shared_rows + self.spec_rows + self.router_rows
        self.W_in = _param(rows > 0, rows, d, **factory)  # [W_shared or A_shared; A_1; ...; A_N; W_router]
        self.N_shared = _param(low_rank_shared, r_s, r_s, **factory)
        self.B_shared = _param(low_rank_shared, d, r_s, **factory)
        self.b_shared = _param(config.shared and bias, d, **factory)
        self.W_router = _param(n > 0 and not self.router_rows, n, d, **factory)  # a frozen router
        self.b_router = _param(n > 0 and bias, n, **factory)
        self.N = _param(n > 0 and r is not None, n, r, r, **factory)
        self.B = _param(n > 0, n, d, r or d, **factory)
        self.b_spec = _param(n > 0 and bias, n, d, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init, under which the model computes exactly what it did before (A_fusion = 0):
        W_shared, B_k and B_shared zeros (normal(init_std) if that is set, for tests); A_k, A_shared and
        W_router Kaiming-uniform as `nn.Linear` (fan-in d); N_k and N_shared the same per expert (fan-in r);
        b_router as `nn.Linear`'s bias, the other biases zeros."""
        self._draw_linear_inits()
        W_shared, _, _ = self.input_weights()
        for weight in _present(W_shared if self.B_shared is None else self.B_shared, self.B):
            if self.init_std:
                nn.init.normal_(weight, std=self.init_std)
            else:
                nn.init.zeros_(weight)
        for bias in _present(self.b_shared, self.b_spec):
            nn.init.zeros_(bias)

    def _draw_linear_inits(self) -> None:
        """`nn.Linear`'s init (weight, bias) of every matrix that is not zero-initialised, in hycam 0.1.0's
        order and with the draws that `reset_parameters` then overwrites, so that a seed still gives the
        weights (and the runs) it gave."""
        W_shared, A, W_router = self.input_weights()
        parts = []  # (weight, bias or None), in the order 0.1.0 built its layers
        if self.B_shared is not None:  # its shared_down drew A_shared twice, then N_shared; then shared
            parts += [(W_shared, None), (W_shared, None), (self.N_shared, None), (self.B_shared, self.b_shared)]
        elif W_shared is not None:
            parts.append((W_shared, self.b_shared))
        if W_router is not None:
            parts.append((W_router, self.b_router))
        if A is not None:  # its spec_down drew A twice, then each N_k (fan-in r)
            parts += [(A, None), (A, None), *((mix, None) for mix in self.N)]
        for weight, bias in parts:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            if bias is not None:
                nn.init.uniform_(bias, -1 / math.sqrt(weight.size(1)), 1 / math.sqrt(weight.size(1)))

    def input_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """W_shared (A_shared under InversePEFT), A_1..A_N stacked, and W_router: views of `W_in` (a frozen
        router: its own parameter), None where absent."""
        if self.W_in is None:
            return None, None, self.W_router
        parts = self.W_in.split([self.shared_rows, self.spec_rows, self.router_rows])
        W_shared, A, W_router = (part if part.size(0) else None for part in parts)
        return W_shared, A, (self.W_router if W_router is None else W_router)

    def router_parameters(self) -> list[nn.Parameter]:
        """The router's own parameters, W_router and b_router: what `train_router=False` freezes."""
        return [p for p in (self.W_router, self.b_router) if p is not None]

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Eq. 9: Gumbel-softmax probabilities, noisy in training (and at evaluation if `eval_noise`)."""
        return gumbel_route(logits, self.tau, noise=self.training or self.eval_noise, hard=self.hard)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """h_norm (B, L, d) -> (A_fusion (B, L, d), router logits, router probabilities (B, L, N_s) or None).

        The one place the path is chosen: a compiler fuses the reference by itself and could not hold
        the fast path's scratch memory; eager runs the fast path, tested equal to the reference."""
        if torch.compiler.is_compiling():
            return self.reference_forward(h)
        return fast.forward(self, h)

    def reference_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Eq. 8-11 as the class docstring writes them: the definition the fast path is tested against."""
        W_shared, A, W_router = self.input_weights()  # (d or r_s, d), (N_s r, d), (N_s, d)
        A_fusion = 0
        if W_shared is not None and self.B_shared is None:
            A_fusion = F.silu(F.linear(h, W_shared, self.b_shared))  # A_shared (B, L, d)
        elif W_shared is not None:  # InversePEFT: W_shared = B_shared N_shared A_shared
            x = F.linear(F.linear(h, W_shared), self.N_shared)  # (B, L, r_s)
            A_fusion = F.silu(F.linear(x, self.B_shared, self.b_shared))  # A_shared (B, L, d)
        if W_router is None:
            return A_fusion, None, None
        logits = F.linear(h, W_router, self.b_router)  # (B, L, N_s)
        p = self.route(logits)  # (B, L, N_s), float32
        if A is None:  # full-rank experts read h_norm itself: W_k = B_k
            x = h.unsqueeze(-2).expand(*h.shape[:-1], self.num_specialized, h.size(-1))  # (B, L, N_s, d)
        else:
            x = F.linear(h, A).unflatten(-1, (self.num_specialized, self.rank))  # (B, L, N_s, r): h A_k^T
            x = self.scale * torch.einsum("...kr,ksr->...ks", x, self.N)  # (B, L, N_s, r): s h A_k^T N_k^T
        pre = torch.einsum("...ks,kds->...kd", x, self.B)  # (B, L, N_s, d)
        A_spec = F.silu(pre if self.b_spec is None else pre + self.b_spec)  # (B, L, N_s, d)
        A_fusion = A_fusion + (p.to(A_spec.dtype).unsqueeze(-1) * A_spec).sum(-2)  # (B, L, d)
        return A_fusion, logits, p


def _param(present: bool, *shape: int, **factory) -> nn.Parameter | None:
    """An uninitialised parameter of `shape` (`reset_parameters` fills it), or None for a part the variant lacks."""
    return nn.Parameter(torch.empty(*shape, **factory)) if present else None


def _present(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]
