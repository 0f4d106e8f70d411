"""How the trained parameters are updated: AdamW's groups, the cosine schedule, the DeepSpeed config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # not top-level on 4.45

from hycam.train.config import TrainConfig


def adamw(params: dict[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at --lr; --weight_decay on matrices only, never on biases, norms or other vectors."""
    groups = [{"params": [p for p in params.values() if _is_matrix(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params.values() if not _is_matrix(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _is_matrix(param: nn.Parameter) -> bool:
    return len(getattr(param, "ds_shape", param.shape)) >= 2  # a ZeRO-3 partition is flat: its whole shape


def numel(param: nn.Parameter) -> int:
    """Elements of `param`, whole: a ZeRO-3 partitioned parameter holds an empty tensor in their place."""
    return getattr(param, "ds_numel", param.numel())


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage the engine runs (a --deepspeed_config file may set another than --zero_stage)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the engine trains in: bf16 when its config enables it, else float32."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    """Linear warm-up over --warmup_ratio of the `total` steps, then cosine decay to lr * --min_lr_ratio."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total,
                                                       min_lr_rate=cfg.min_lr_ratio)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The engine's config from the options; a --deepspeed_config file overrides its entries."""
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": _zero(cfg),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed_config {path}: no such file")
        config.update(json.loads(path.read_text()))
    return config


HOST_ZERO3 = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0, "reduce_bucket_size": 5_000_000,
              "sub_group_size": 10_000_000}
"""ZeRO-3 settings of a run without a GPU, where every gathered parameter and buffer is host memory (measured in
docs/PERFORMANCE.md). DeepSpeed's defaults are sized for a GPU: a reuse distance of 1e9 parameters keeps every
parameter gathered in the forward whole until the backward (the whole model on each rank), a prefetch gathers
the next modules early (and leaves them in flight after a validation forward), the gradient bucket (5e8) holds
every trainable gradient whole before the reduce, and one optimizer sub-group makes the step's temporaries as
large as the rank's whole partition."""


def _zero(cfg: TrainConfig) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if cfg.zero_stage == 3 and not torch.cuda.is_available():
        zero.update(HOST_ZERO3)
    return zero
