"""The pieces of main.py's training loop: data, DeepSpeed config, schedule, validation, logs."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hycam.data import Record, first_per_task, load_records, split_records, synthetic_tasks
from hycam.data import collate, tokenize_records
from hycam.train.config import TrainConfig


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a plain `python main.py` becomes a one-process group."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def load_task_records(cfg: TrainConfig, log) -> list[Record]:
    existing = [p for p in cfg.data if Path(p).exists()]
    if existing:
        records = load_records(existing)
    elif cfg.synthetic_if_missing:
        log(f"no --data path exists ({', '.join(cfg.data)}): training on the generated five-task set instead")
        records = synthetic_tasks(cfg.max_records_per_task or 200, seed=cfg.split_seed)
    else:
        raise FileNotFoundError(f"--data: none of {cfg.data} exists")
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
        examples, stats = tokenize_records(splits[name], tokenizer, cfg.max_length, template=cfg.template,
                                           loss_on=cfg.loss_on, overflow=cfg.overflow)
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


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier at optimizer step `step`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self.board.add_scalar(f"{record['split']}/{key}", value, record["step"])
            for task, value in record.get("tasks", {}).items():
                self.board.add_scalar(f"{record['split']}/loss_{task}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
