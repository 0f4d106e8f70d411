"""The pieces of main.py's training loop: data, DeepSpeed config, schedule, validation, logs."""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # not top-level on 4.45

from hycam.data import SYNTHETIC, Record, collate, first_per_task, load_sources, split_records, tokenize_cached
from hycam.train.config import TrainConfig


def init_distributed(timeout_seconds: float) -> tuple[int, int]:
    """(rank, world size); a plain `python main.py` becomes a one-process group. A collective that
    waits longer than `timeout_seconds` for another rank raises instead of hanging."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_seconds)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    # DeepSpeed makes its data-parallel groups with new_group(), which takes torch's default timeout
    # (30 minutes), not the world group's: make the default this run's.
    c10d = dist.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    return dist.get_rank(), dist.get_world_size()


def load_task_records(cfg: TrainConfig, log) -> list[Record]:
    """The records of every --data item (a missing path is a DataError naming it), capped per task."""
    records = load_sources(cfg.data, seed=cfg.split_seed, synthetic_per_task=cfg.max_records_per_task or 200)
    if SYNTHETIC in cfg.data:
        log(f"--data {SYNTHETIC}: the generated five-task set, {cfg.max_records_per_task or 200} records per task")
    if cfg.max_records_per_task is None:
        return records
    return first_per_task(records, cfg.max_records_per_task)


def prepare_splits(cfg: TrainConfig, tokenizer, log) -> dict[str, list[dict]]:
    """Tokenised train and validation examples (the test split is left to the evaluation)."""
    splits = split_records(load_task_records(cfg, log), seed=cfg.split_seed, fold=cfg.fold, num_folds=cfg.num_folds)
    if cfg.max_eval_records_per_task is not None:
        splits["validation"] = first_per_task(splits["validation"], cfg.max_eval_records_per_task)
    out = {}
    for name in ("train", "validation"):
        examples, stats = tokenize_cached(splits[name], tokenizer, cfg.max_length, template=cfg.template,
                                          loss_on=cfg.loss_on, overflow=cfg.overflow, num_proc=cfg.num_proc)
        log(f"{name}: {stats.summary()}")
        if not examples:
            raise ValueError(f"the {name} split is empty after tokenisation (--max_length {cfg.max_length}?)")
        out[name] = examples
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    zero = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
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


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    """Linear warm-up over --warmup_ratio of the `total` steps, then cosine decay to lr * --min_lr_ratio."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total,
                                                       min_lr_rate=cfg.min_lr_ratio)


@torch.no_grad()
def validation_loss(engine, examples: list[dict], batch_size: int, pad_id: int, rank: int, world: int) -> dict:
    """Token-level task loss on the validation examples, overall and per task, over all ranks."""
    model = engine.module
    was_training = model.training
    model.eval()
    tasks = sorted({e["task"] for e in examples})
    sums = torch.zeros(len(tasks), 2, dtype=torch.float64)  # (task, [nll, tokens])
    mine = examples[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], pad_id)
        names = batch.pop("task")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
        for name, value, count in zip(names, nll.tolist(), (targets != -100).sum(1).tolist()):
            sums[tasks.index(name)] += torch.tensor([value, count], dtype=torch.float64)
    dist.all_reduce(sums)
    model.train(was_training)
    per_task = {t: (s[0] / s[1].clamp_min(1)).item() for t, s in zip(tasks, sums)}
    return {"loss": (sums[:, 0].sum() / sums[:, 1].sum().clamp_min(1)).item(), "tasks": per_task}


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines of metrics.jsonl logged after `step`, which a run resumed there logs again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _json_safe(value):
    """`value` with NaN and infinities as null: JSON has no number for them."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.file = self.board = None
        if not enabled:
            return
        self.file = (out_dir / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            self.board = None

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = _json_safe(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self.board.add_scalar(f"{record['split']}/{key}", value, record["step"])
            for task, value in record.get("tasks", {}).items():
                if value is not None:
                    self.board.add_scalar(f"{record['split']}/loss_{task}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
