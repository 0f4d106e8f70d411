"""The HyCAM module of one decoder layer: shared CAM, specialized CAMs and their router.

Paper, Section 3.3:
    A_shared = SiLU(h_norm W_shared)                       W_shared: d x d, zeros at init
    A_spec_k = SiLU(h_norm (B_k N_k A_k)^T)                A_k: r x d, N_k: r x r, B_k: d x r (zeros)
    p        = softmax((h_norm W_router + g) / tau)        g ~ Gumbel(0, 1)
    A_fusion = A_shared + sum_k p_k A_spec_k
    h_out    = h_att + h_att * A_fusion
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hycam.config import HyCAMConfig
from hycam.fusion import modulation_at_inference, weighted_silu_sum
from hycam.projection import Projection
from hycam.routing import gumbel_route


class Router(Projection):
    """Token-level router; returns the logits and the Gumbel-softmax probabilities (Eq. 8-9)."""

    def __init__(self, hidden_size: int, config: HyCAMConfig, **factory) -> None:
        super().__init__(hidden_size, config.num_specialized, bias=config.bias, **factory)
        self.tau, self.hard, self.eval_noise = config.tau, config.hard_routing, config.eval_noise
        self.recorder = None  # the model's RoutingRecorder, once hycam.apply has put this router in a model

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(super().forward(h))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, L, N_s) -> (logits, probs)."""
        probs = gumbel_route(logits, self.tau, noise=self.training or self.eval_noise, hard=self.hard)
        if self.recorder is not None:
            self.recorder.record(logits, probs)
        return logits, probs


class LowRankDown(nn.Module):
    """The x -> x A_k^T N_k^T half of n SLoRA projections, all experts in one matmul."""

    def __init__(self, hidden_size: int, rank: int, num: int, **factory) -> None:
        super().__init__()
        self.rank, self.num = rank, num
        self.down = Projection(hidden_size, num * rank, bias=False, **factory)  # A_1..A_n stacked
        self.mix = nn.Parameter(torch.empty(num, rank, rank, **factory))  # N_1..N_n
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for mix in self.mix:  # per expert, so that the fan-in is r
            nn.init.kaiming_uniform_(mix, a=math.sqrt(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mix_experts(self.down(h))

    def mix_experts(self, a: torch.Tensor) -> torch.Tensor:
        """x A^T (B, L, n r) -> x A_k^T N_k^T (B, L, n, r)."""
        x = a.reshape(-1, self.num, self.rank).transpose(0, 1)  # (n, T, r), T = B * L
        x = torch.bmm(x, self.mix.transpose(1, 2))  # (n, T, r): x_k N_k^T, expert-major for the up-projection
        return x.transpose(0, 1).reshape(*a.shape[:-1], self.num, self.rank)  # (B, L, n, r), a view


class HyCAM(nn.Module):
    """Computes A_fusion from h_norm for one layer. The caller applies it to h_att."""

    def __init__(self, hidden_size: int, config: HyCAMConfig, **factory) -> None:
        super().__init__()
        n, d = config.num_specialized, hidden_size
        self.shared = self.shared_down = None
        if config.shared and config.shared_rank is None:
            self.shared = Projection(d, d, bias=config.bias, **factory)
        elif config.shared:  # InversePEFT: low-rank shared CAM, W_shared = B N A
            self.shared_down = LowRankDown(d, config.shared_rank, 1, **factory)
            self.shared = Projection(config.shared_rank, d, bias=config.bias, **factory)
        self.router = Router(d, config, **factory) if n else None
        self.spec_down = LowRankDown(d, config.rank, n, **factory) if n and config.rank else None
        inner = config.rank or d
        self.spec_up = nn.Parameter(torch.empty(n, d, inner, **factory)) if n else None  # B_1..B_n
        self.spec_bias = nn.Parameter(torch.empty(n, d, **factory)) if n and config.bias else None
        self.scale = config.lora_alpha / config.rank if config.lora_alpha else 1.0
        self.reset_parameters(config.init_std)
        self._inputs = self._adjacent_input_weights()
        self._inference_cache = None
        self._input_sizes = [layer.out_features for layer in self._inputs]

    def _adjacent_input_weights(self) -> list[Projection]:
        """The linear layers that read h_norm (W_shared, A_1..A_n, W_router), their weights moved into
        one tensor, rows back to back, so that inference can multiply by all three at once."""
        layers = [self.shared, getattr(self.spec_down, "down", None), self.router]
        # Not under ZeRO-3 (ds_id): DeepSpeed owns those parameters and their partitions.
        if any(layer is None or layer.bias is not None or hasattr(layer.weight, "ds_id") for layer in layers) \
                or self.shared_down is not None:
            return []
        merged = torch.cat([layer.weight.detach() for layer in layers])
        rows = 0
        for layer in layers:
            layer.weight = nn.Parameter(merged[rows : rows + layer.out_features], layer.weight.requires_grad)
            rows += layer.out_features
        return layers

    def _merged_input_weight(self) -> torch.Tensor | None:
        """[W_shared; A; W_router] as one view, while the weights still lie back to back in one storage
        (`.to()`, a deep copy or a DeepSpeed partition may have moved them apart), else None."""
        if not self._inputs:
            return None
        weights = [layer.weight for layer in self._inputs]
        first, end = weights[0], weights[0].data_ptr()
        for w in weights:
            if (w.data_ptr() != end or not w.is_contiguous() or w.dtype != first.dtype
                    or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
                return None
            end += w.numel() * w.element_size()
        return first.detach().as_strided((sum(w.size(0) for w in weights), first.size(1)), first.stride())

    def _inference_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a no-grad forward: the merged input weight and scale * (B_k N_k)^T, `[N_s, r, d]`, else None.

        Folding N_k into B_k saves a batched matmul per layer and token when decoding. The fold is kept until
        a weight it came from changes: moved (data pointer) or written in place (version counter, which an
        optimiser step or `load_state_dict` bumps). It costs one more copy of the B_k's size.
        """
        # Compiled: storage pointers are Python-level facts a graph cannot hold; the compiler fuses anyway.
        if not self._inputs or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        up, mix = self.spec_up, self.spec_down.mix
        key = (*(layer.weight.data_ptr() for layer in self._inputs), up.data_ptr(), up._version, mix.data_ptr(),
               mix._version, up.dtype)
        if self._inference_cache is None or self._inference_cache[0] != key:
            merged = self._merged_input_weight()
            if merged is None:
                return None
            with torch.inference_mode(False):  # an inference tensor could not be reused outside inference mode
                wide = torch.promote_types(up.dtype, torch.float32)  # the fold itself rounds only once
                folded = (self.scale * up.detach().to(wide) @ mix.detach().to(wide)).transpose(1, 2)
                self._inference_cache = (key, merged, folded.to(up.dtype).contiguous())
        return self._inference_cache[1:]

    def _apply(self, fn, recurse=True):
        self._inference_cache = None  # `.to()` and the like: it would keep the old weights alive
        return super()._apply(fn, recurse)

    def reset_parameters(self, std: float = 0.0) -> None:
        """Zeros for W_shared and B_k (the model is unchanged at step 0); biases zero too."""
        for weight in (getattr(self.shared, "weight", None), self.spec_up):
            if weight is not None:
                nn.init.normal_(weight, std=std) if std else nn.init.zeros_(weight)
        for bias in (getattr(self.shared, "bias", None), self.spec_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h_norm (B, L, d) -> A_fusion (B, L, d), Eq. 11."""
        fast = self._inference_weights()
        if fast is not None:  # inference: one matmul for the three, not three small ones (decoding)
            merged, up = fast
            shared, a, logits = F.linear(h, merged).split(self._input_sizes, dim=-1)
            _, probs = self.router.route(logits)
            return modulation_at_inference(shared, a, probs, up)
        if self.router is None:
            return self.shared_modulation(h)
        spec = self.specialized_modulation(h)
        return spec if self.shared is None else self.shared_modulation(h) + spec

    def shared_modulation(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.shared_down is None else self.shared_down(h).squeeze(-2)  # (B, L, d or r)
        return F.silu(self.shared(x))  # A_shared, (B, L, d)

    def specialized_modulation(self, h: torch.Tensor) -> torch.Tensor:
        _, probs = self.router(h)  # (B, L, N_s)
        if self.spec_down is not None:
            x = self.spec_down(h)  # (B, L, N_s, r)
        else:  # full rank: every expert reads h itself; expand makes no copy
            x = h.unsqueeze(-2).expand(*h.shape[:-1], self.spec_up.size(0), h.size(-1))
        return self.fuse(x, probs)

    def fuse(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """x (B, L, N_s, r or d), probs (B, L, N_s) -> sum_k p_k A_spec_k (B, L, d)."""
        x = x if self.scale == 1.0 else x * self.scale  # 1.0 unless low-rank with lora_alpha
        return weighted_silu_sum(x, self.spec_up, self.spec_bias, probs.to(x.dtype))
