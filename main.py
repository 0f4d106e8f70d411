"""Multi-task supervised fine-tuning with DeepSpeed: HyCAM, its ablations and the paper's baselines.

    python main.py --config configs/cpu_smollm2.yaml            # one process (CPU or one GPU)
    deepspeed main.py --config configs/qwen2.5-0.5b.yaml        # every GPU of this machine
    bash run_model_base.sh --help                               # multi-GPU / multi-node launcher

Loss: L_task + lambda_balance * L_balance (paper Eq. 13): the model returns L_task as its loss and attaches the
second term's gradient itself (hycam.outputs), weighted per optimizer step (set_gradient_accumulation).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import hycam
from hycam import enable_checkpointing
from hycam.baselines import methods
from hycam.data import DataError, collate, multitask_batches
from hycam.data.models import load_model, load_tokenizer
from hycam.train import resume, rundir
from hycam.train.config import ConfigError, TrainConfig, parse_args
from hycam.train.guards import Interrupted, Interrupts, StaleBuildLock, check_build_locks, signal_name
from hycam.train.run import (MetricsLog, cosine_schedule, deepspeed_config, init_distributed, prepare_splits,
                             truncate_metrics, validation_loss)


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
    interrupts: Interrupts
    metrics: MetricsLog | None = None
    signum: int = 0  # a signal some rank received: save and stop at the end of this step

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def main(argv: list[str] | None = None) -> tuple[Progress, torch.nn.Module]:
    """Trains as `argv` says; returns where the run stopped and the trained model."""
    cfg = parse_args(argv)
    check_build_locks(cfg.stale_lock_minutes)
    rank, world = init_distributed(cfg.dist_timeout)
    log = (lambda msg: tqdm.write(f"[hycam] {msg}")) if rank == 0 else (lambda msg: None)
    with Interrupts() as interrupts, rundir.claim(cfg, world, rank, log) as resuming:
        run = setup(cfg, rank, world, log, interrupts, record=not resuming)
        progress = _load_resume(run) if resuming else Progress()
        run.metrics = MetricsLog(run.out, enabled=rank == 0)
        try:
            stop = train(run, progress)
        finally:
            run.metrics.close()
        if stop is not None:
            methods.save_trained(run.engine.module, cfg.method, run.options, rundir.staging(run.out, "last", rank),
                                 {**run.meta, "step": progress.step})
            rundir.swap_in(run.out, "last", rank)
            log(f"stopped: {stop}. best validation loss {progress.best:.4f}; checkpoints in {run.out}/best, /last")
            log(f"evaluate it: hycam-eval --checkpoint {run.out / 'best'}")
            if rank == 0:
                (run.out / "summary.json").write_text(json.dumps(_progress_json(progress) | {"stop": stop},
                                                                 indent=2) + "\n")
    return progress, run.engine.module


def setup(cfg: TrainConfig, rank: int, world: int, log, interrupts: Interrupts, record: bool) -> Run:
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
    if hycam.is_applied(model):  # DeepSpeed's backward divides the loss by grad_accum; the balance term too
        hycam.set_gradient_accumulation(model, cfg.grad_accum)
    params = methods.trainable(model, cfg.method)
    trainable = sum(p.numel() for p in params.values())
    log(f"{cfg.method}: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")

    batches = len(multitask_batches(splits["train"], cfg.micro_batch_size * world, cfg.split_seed, 0,
                                    drop_last=world > 1))
    total = cfg.max_steps or max(1, cfg.epochs * batches // cfg.grad_accum)
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
                                      lr_scheduler=cosine_schedule(optimizer, cfg, total))
    engine.train()  # from_pretrained returns the model in eval mode: no routing noise, no dropout
    if rank == 0 and record:
        info = {**asdict(cfg), "world_size": world, "trainable_parameters": trainable}
        (Path(cfg.output_dir) / "run_config.json").write_text(json.dumps(info, indent=2) + "\n")
    meta = {"model": cfg.model, "gguf_file": cfg.gguf_file, "seed": cfg.seed, "data_seed": cfg.split_seed,
            "template": cfg.template, "pad_id": tokenizer.pad_token_id}
    return Run(cfg, rank, world, engine, options, splits, meta, total, log, interrupts)


def train(run: Run, progress: Progress) -> str | None:
    """The loop; returns why it stopped, or None when --halt_after_steps cut it short."""
    cfg = run.cfg
    start = time.time()
    run.interrupts.armed = True
    with tqdm(total=run.total, initial=progress.step, disable=run.rank != 0, desc=cfg.method,
              dynamic_ncols=True) as bar:  # closed on every way out, so messages start on a line of their own
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
                evaluated = progress.step % cfg.eval_interval == 0 or progress.step >= run.total
                if evaluated:
                    stop = _evaluate(run, progress)
                if progress.step >= run.total:
                    stop = stop or "reached the last step"
                if run.signum and not stop:
                    _stop_for_signal(run, progress, saved=evaluated)
                if cfg.halt_after_steps is not None and progress.step >= cfg.halt_after_steps:
                    run.log(f"halting after step {progress.step} as asked (--halt_after_steps): resume with --resume")
                    return None
                if stop:
                    return stop
            progress.epoch, progress.batch = progress.epoch + 1, 0


def _micro_step(run: Run, examples: list[dict], progress: Progress):
    batch = collate(examples, run.meta["pad_id"])
    batch.pop("task")
    batch = {k: v.to(run.engine.device) for k, v in batch.items()}
    output = run.engine(**batch)
    _agree_to_go_on(run, output.loss, progress)
    run.engine.backward(output.loss)
    run.engine.step()
    progress.batch += 1
    progress.tokens += int(batch["attention_mask"].sum()) * run.world
    return output


def _agree_to_go_on(run: Run, loss: torch.Tensor, progress: Progress) -> None:
    """One collective per micro-batch tells every rank whether any has a non-finite loss or a signal."""
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(run.interrupts.signum)], device=loss.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item():
        raise SystemExit(f"[hycam] rank {run.rank}: the loss is {loss.item()} at step {progress.step + 1}; "
                         f"stopping. {_kept(run.out)}")
    run.signum = run.signum or int(flags[1].item())


def _stop_for_signal(run: Run, progress: Progress, saved: bool) -> None:
    if not saved:
        _save_resume(run, progress)
    raise Interrupted(run.signum, f"stopped by {signal_name(run.signum)} after step {progress.step}: its resume "
                                  f"state is in {run.out}/resume; continue with --resume true")


def _kept(out: Path) -> str:
    """What a stopped run leaves to use, as it is on disk."""
    kept = [f"{out}/{name}" for name in ("best", "resume") if (out / name).is_dir()]
    if kept:
        return f"The last good checkpoints are kept in {' and '.join(kept)}."
    return f"No evaluation finished before, so no checkpoint was kept; a new run may reuse {out}."


def _train_record(run: Run, output, progress: Progress, seconds: float) -> dict:
    task, balance = _item(output.loss), _item(output.get("balance_loss"))
    coef = getattr(getattr(run.engine.module, "hycam_config", None), "balance_coef", 0.0)
    # loss: the objective trained (Eq. 13); task_loss: the model's output.loss; balance_loss: Eq. 10 unweighted
    return {"step": progress.step, "split": "train", "loss": task if math.isnan(balance) else task + coef * balance,
            "task_loss": task, "balance_loss": balance,
            "lr": run.engine.get_lr()[0], "tokens_per_s": progress.tokens / seconds}


def _evaluate(run: Run, progress: Progress) -> str | None:
    """Validation loss, best checkpoint, resume state and early stopping; returns a reason to stop."""
    cfg = run.cfg
    batch_size = cfg.eval_batch_size or 2 * cfg.micro_batch_size
    result = validation_loss(run.engine, run.splits["validation"], batch_size, run.meta["pad_id"], run.rank, run.world)
    run.metrics.write({"step": progress.step, "split": "validation", **result})
    if not math.isfinite(result["loss"]):
        raise SystemExit(f"[hycam] the validation loss is {result['loss']} at step {progress.step}; stopping. "
                         f"{_kept(run.out)}")
    run.log(f"step {progress.step}: validation loss {result['loss']:.4f} "
            + " ".join(f"{t}={v:.3f}" for t, v in result["tasks"].items()))
    if result["loss"] < progress.best:
        progress.best, progress.bad_evals = result["loss"], 0
        methods.save_trained(run.engine.module, cfg.method, run.options, rundir.staging(run.out, "best", run.rank),
                             {**run.meta, "step": progress.step, "validation_loss": result["loss"]})
        rundir.swap_in(run.out, "best", run.rank)
    else:
        progress.bad_evals += 1
    _save_resume(run, progress)
    if cfg.patience and progress.bad_evals >= cfg.patience:
        return f"early stopping: no better validation loss in {cfg.patience} evaluations"
    return None


def _save_resume(run: Run, progress: Progress) -> None:
    tmp = rundir.staging(run.out, "resume", run.rank)
    resume.write(tmp, run.engine, methods.trainable(run.engine.module, run.cfg.method), _progress_json(progress),
                 run.rank, run.world)
    rundir.swap_in(run.out, "resume", run.rank)


def _load_resume(run: Run) -> Progress:
    saved = resume.read(run.out / "resume", run.engine, methods.trainable(run.engine.module, run.cfg.method),
                        run.rank, run.world)
    progress = Progress(**{**saved, "best": math.inf if saved["best"] is None else saved["best"]})
    if run.rank == 0:
        truncate_metrics(run.out / "metrics.jsonl", progress.step)
    return progress


def _progress_json(progress: Progress) -> dict:
    """`progress` as JSON holds it: no best loss yet is null, not Infinity."""
    return {**asdict(progress), "best": progress.best if math.isfinite(progress.best) else None}


def _item(value) -> float:
    return float("nan") if value is None else float(value.detach())


def cli(argv: list[str]) -> None:
    """main() for a shell: usage and data errors as one line with exit code 2, signals as 128 + signum."""
    try:
        main(argv)
    except (ConfigError, DataError, rundir.RunDirError, StaleBuildLock) as err:
        _say(f"main.py: error: {err}")
        sys.exit(2)
    except Interrupted as err:
        _say(f"[hycam] {err}")
        sys.exit(128 + err.signum)
    except RuntimeError as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        _say(f"[hycam] rank {os.environ.get('RANK', 0)}: another rank did not answer within --dist_timeout "
             f"(it stopped or died); stopping. ({str(err).strip().splitlines()[0]})")
        sys.exit(1)


def _say(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr)


if __name__ == "__main__":
    cli(sys.argv[1:])
