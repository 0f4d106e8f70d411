"""Multi-task supervised fine-tuning with DeepSpeed: HyCAM, its ablations and the paper's baselines.

    python main.py --config configs/cpu_smollm2.yaml            # one process (CPU or one GPU)
    deepspeed main.py --config configs/qwen2.5-0.5b.yaml        # every GPU of this machine
    bash run_model_base.sh --help                               # multi-GPU / multi-node launcher

Loss: L_task + lambda_balance * L_balance (paper Eq. 13; the model adds the second term).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from hycam import enable_checkpointing
from hycam.baselines import methods
from hycam.data.models import load_model, load_tokenizer
from hycam.data import collate, multitask_batches
from hycam.train.config import TrainConfig, parse_args
from hycam.train.run import (MetricsLog, cosine_with_warmup, deepspeed_config, init_distributed, prepare_splits,
                            validation_loss)


@dataclass
class Progress:
    """Where the run is; saved with every resume state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch done
    best: float = math.inf  # best validation loss
    bad_evals: int = 0  # evaluations since the best one
    tokens: int = 0


@dataclass
class Run:
    """What every part of the loop reads."""

    cfg: TrainConfig
    rank: int
    world: int
    engine: object
    options: methods.MethodOptions
    splits: dict
    meta: dict  # recorded in every checkpoint's method.json
    total: int  # optimizer steps of the schedule
    log: object
    metrics: MetricsLog | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def main(argv: list[str] | None = None) -> tuple[Progress, torch.nn.Module]:
    """Trains as `argv` says; returns where the run stopped and the trained model."""
    cfg = parse_args(argv)
    rank, world = init_distributed()
    log = (lambda msg: tqdm.write(f"[hycam] {msg}")) if rank == 0 else (lambda msg: None)
    _check_output_dir(Path(cfg.output_dir), cfg.resume)
    run = setup(cfg, rank, world, log)
    progress = _load_resume(run.engine, run.out) if cfg.resume else Progress()
    run.metrics = MetricsLog(run.out, enabled=rank == 0)
    stop = train(run, progress)
    if stop is not None:
        methods.save_trained(run.engine.module, cfg.method, run.options, run.out / "last",
                             {**run.meta, "step": progress.step})
        log(f"stopped: {stop}. best validation loss {progress.best:.4f}; checkpoints in {run.out}/best, /last")
        if rank == 0:
            (run.out / "summary.json").write_text(json.dumps({**asdict(progress), "stop": stop}, indent=2) + "\n")
    run.metrics.close()
    return progress, run.engine.module


def setup(cfg: TrainConfig, rank: int, world: int, log) -> Run:
    """Data, model with the method, AdamW with the cosine schedule, and the DeepSpeed engine."""
    import deepspeed

    torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank
    tokenizer = load_tokenizer(cfg.model, cfg.gguf_file)
    splits = prepare_splits(cfg, tokenizer, log)
    model = load_model(cfg.model, cfg.gguf_file)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    options = methods.MethodOptions(**{f.name: getattr(cfg, f.name) for f in fields(methods.MethodOptions)})
    model = methods.prepare(model, cfg.method, options)
    params = methods.trainable(model, cfg.method)
    trainable = sum(p.numel() for p in params.values())
    log(f"{cfg.method}: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")

    batches = len(multitask_batches(splits["train"], cfg.micro_batch_size * world, cfg.split_seed, 0,
                                    drop_last=world > 1))
    total = cfg.max_steps or max(1, cfg.epochs * batches // cfg.grad_accum)
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    warmup = int(cfg.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup,
                                                                                         cfg.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(cfg, world))
    engine.train()  # from_pretrained returns the model in eval mode: no routing noise, no dropout
    if rank == 0 and not cfg.resume:
        info = {**asdict(cfg), "world_size": world, "trainable_parameters": trainable}
        (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(info, indent=2) + "\n")
    meta = {"model": cfg.model, "gguf_file": cfg.gguf_file, "seed": cfg.seed, "data_seed": cfg.split_seed,
            "template": cfg.template, "pad_id": tokenizer.pad_token_id}
    return Run(cfg, rank, world, engine, options, splits, meta, total, log)


def train(run: Run, progress: Progress) -> str | None:
    """The loop; returns why it stopped, or None when --halt_after_steps cut it short."""
    cfg = run.cfg
    bar = tqdm(total=run.total, initial=progress.step, disable=run.rank != 0, desc=cfg.method, dynamic_ncols=True)
    start = time.time()
    while True:
        batches = multitask_batches(run.splits["train"], cfg.micro_batch_size * run.world, cfg.split_seed,
                                    progress.epoch, drop_last=run.world > 1)
        for index in range(progress.batch, len(batches)):
            if progress.batch % cfg.grad_accum == 0:  # a new optimizer step: its own routing noise
                torch.manual_seed(cfg.seed * 1_000_003 + progress.step * 101 + run.rank)
            mine = batches[index][run.rank * cfg.micro_batch_size : (run.rank + 1) * cfg.micro_batch_size]
            output = _micro_step(run, mine, progress)
            if progress.batch % cfg.grad_accum:
                continue
            progress.step += 1
            record = _train_record(run, output, progress, time.time() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", bal=f"{record['balance_loss']:.3f}",
                            lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if progress.step % cfg.log_interval == 0:
                run.metrics.write(record)
            stop = None
            if progress.step % cfg.eval_interval == 0 or progress.step >= run.total:
                stop = _evaluate(run, progress)
            if progress.step >= run.total:
                stop = stop or "reached the last step"
            if cfg.halt_after_steps is not None and progress.step >= cfg.halt_after_steps:
                run.log(f"halting after step {progress.step} as asked (--halt_after_steps): resume with --resume")
                return None
            if stop:
                bar.close()
                return stop
        progress.epoch, progress.batch = progress.epoch + 1, 0


def _micro_step(run: Run, examples: list[dict], progress: Progress):
    batch = collate(examples, run.meta["pad_id"])
    batch.pop("task")
    batch = {k: v.to(run.engine.device) for k, v in batch.items()}
    output = run.engine(**batch)
    _stop_if_not_finite(output.loss, progress, run.out, run.rank)
    run.engine.backward(output.loss)
    run.engine.step()
    progress.batch += 1
    progress.tokens += int(batch["attention_mask"].sum()) * run.world
    return output


def _train_record(run: Run, output, progress: Progress, seconds: float) -> dict:
    return {"step": progress.step, "split": "train", "loss": _item(output.loss),
            "task_loss": _item(output.get("task_loss", output.loss)), "balance_loss": _item(output.get("balance_loss")),
            "lr": run.engine.get_lr()[0], "tokens_per_s": progress.tokens / seconds}


def _evaluate(run: Run, progress: Progress) -> str | None:
    """Validation loss, best checkpoint, resume state and early stopping; returns a reason to stop."""
    cfg = run.cfg
    batch_size = cfg.eval_batch_size or 2 * cfg.micro_batch_size
    result = validation_loss(run.engine, run.splits["validation"], batch_size, run.meta["pad_id"], run.rank, run.world)
    run.metrics.write({"step": progress.step, "split": "validation", **result})
    if not math.isfinite(result["loss"]):
        raise SystemExit(f"[hycam] the validation loss is {result['loss']} at step {progress.step}; stopping. "
                         f"The last good checkpoints are kept in {run.out}/best and {run.out}/resume.")
    run.log(f"step {progress.step}: validation loss {result['loss']:.4f} "
            + " ".join(f"{t}={v:.3f}" for t, v in result["tasks"].items()))
    if result["loss"] < progress.best:
        progress.best, progress.bad_evals = result["loss"], 0
        methods.save_trained(run.engine.module, cfg.method, run.options, run.out / "best",
                             {**run.meta, "step": progress.step, "validation_loss": result["loss"]})
    else:
        progress.bad_evals += 1
    _save_resume(run.engine, run.out, progress, run.rank)
    if cfg.patience and progress.bad_evals >= cfg.patience:
        return f"early stopping: no better validation loss in {cfg.patience} evaluations"
    return None


def _save_resume(engine, out: Path, progress: Progress, rank: int) -> None:
    """DeepSpeed state (trainable weights, optimizer, schedule) swapped in whole, never half-written."""
    tmp, final = out / ".resume.tmp", out / "resume"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="state", client_state={"progress": asdict(progress)},
                           exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        old = out / ".resume.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_resume(engine, out: Path) -> Progress:
    if not (out / "resume").is_dir():
        raise FileNotFoundError(f"--resume: {out}/resume does not exist (no evaluation finished before the stop)")
    _, client = engine.load_checkpoint(str(out / "resume"), tag="state", load_module_strict=False)
    progress = Progress(**client["progress"])
    _truncate_metrics(out / "metrics.jsonl", progress.step)
    return progress


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines logged after the resume point, which the resumed run logs again."""
    if dist.get_rank() != 0 or not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _check_output_dir(out: Path, resume: bool) -> None:
    if not resume and (out / "metrics.jsonl").exists():
        raise FileExistsError(f"--output_dir {out} already holds a run: pass --resume, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)


def _stop_if_not_finite(loss: torch.Tensor, progress: Progress, out: Path, rank: int) -> None:
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    dist.all_reduce(bad)
    if bad.item():
        raise SystemExit(f"[hycam] rank {rank}: the loss is {loss.item()} at step {progress.step + 1}; stopping. "
                         f"The last good checkpoints are kept in {out}/best and {out}/resume.")


def _item(value) -> float:
    return float("nan") if value is None else float(value.detach())


if __name__ == "__main__":
    main(sys.argv[1:])
