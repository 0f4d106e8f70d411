"""The training loop, read top-down: `main` -> `setup` -> `fit` (micro-steps, `validate`) -> last/.

Loss: L_task + lambda_balance * L_balance (paper Eq. 13): the model returns L_task as its loss and attaches
the second term's gradient itself, weighted per optimizer step (`hycam.set_gradient_accumulation`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import hycam
from hycam import enable_checkpointing
from hycam.baselines import methods
from hycam.data import DataError, collate, multitask_batches
from hycam.data.models import load_model, load_tokenizer
from hycam.files import BEST, LAST, RESUME, RUN_CONFIG, SUMMARY
from hycam.train import checkpoints, rundir
from hycam.train.config import ConfigError, TrainConfig, parse_args
from hycam.train.distributed import (init_distributed, launcher_pid, lost_rank, return_freed_host_memory,
                                     sharded_construction)
from hycam.train.guards import (Interrupted, Interrupts, StaleBuildLock, check_build_locks, leave_group, say,
                                signal_name)
from hycam.train.metrics import MetricsLog
from hycam.train.optimization import adamw, cosine_schedule, deepspeed_config, numel, training_dtype, zero_stage
from hycam.train.splits import prepare_splits
from hycam.train.state import Progress, Run
from hycam.train.validation import validation_loss


def main(argv: list[str] | None = None) -> tuple[Progress, torch.nn.Module]:
    """Trains as `argv` says; returns where the run stopped and the trained model."""
    cfg = parse_args(argv)
    check_build_locks(cfg.stale_lock_minutes)
    rank, world = init_distributed(cfg.dist_timeout)
    log = (lambda msg: tqdm.write(f"[hycam] {msg}")) if rank == 0 else (lambda msg: None)
    with Interrupts(launcher=launcher_pid()) as interrupts, rundir.claim(cfg, world, rank, log) as resuming:
        run = setup(cfg, rank, world, log, interrupts, record=not resuming)
        progress = checkpoints.load_resume(run) if resuming else Progress()
        run.metrics = MetricsLog(run.out, enabled=rank == 0)
        try:
            stop = fit(run, progress)
        finally:
            run.metrics.close()
        if stop is not None:
            _finish(run, progress, stop)
    return progress, run.engine.module


def setup(cfg: TrainConfig, rank: int, world: int, log: Callable[[str], None], interrupts: Interrupts,
          record: bool) -> Run:
    """Data, model with the method, AdamW with the cosine schedule, and the DeepSpeed engine; `record`
    writes run_config.json (a new run, not a resumed one)."""
    import deepspeed

    torch.manual_seed(cfg.seed)  # the same adapter initialisation on every rank
    tokenizer = load_tokenizer(cfg.model, cfg.gguf_file, cfg.revision)
    splits = prepare_splits(cfg, tokenizer, log)
    total = _schedule_steps(cfg, splits["train"], world)  # before the model: a split too small fails at once
    ds_config = deepspeed_config(cfg, world)
    if zero_stage(ds_config) == 3 and not torch.cuda.is_available():
        return_freed_host_memory()  # the gathered parameters live in host memory
    model, options = _model_with_method(cfg, ds_config)
    params = methods.trainable(model, cfg.method)
    trainable = sum(numel(p) for p in params.values())
    log(f"{cfg.method}: {trainable:,} trainable of {sum(numel(p) for p in model.parameters()):,} parameters")
    checkpoints.check_space(Path(cfg.output_dir), trainable)  # before training, not at its first save
    optimizer = adamw(params, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      lr_scheduler=cosine_schedule(optimizer, cfg, total))
    engine.train()  # from_pretrained returns the model in eval mode: no routing noise, no dropout
    if rank == 0 and record:
        info = {**asdict(cfg), "world_size": world, "trainable_parameters": trainable}
        (Path(cfg.output_dir) / RUN_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    meta = {"model": cfg.model, "gguf_file": cfg.gguf_file, "revision": cfg.revision,
            "quantization": cfg.quantization, "seed": cfg.seed, "data_seed": cfg.split_seed,
            "template": cfg.template, "pad_id": tokenizer.pad_token_id}
    return Run(cfg, rank, world, engine, options, splits, meta, total, log, interrupts)


def _schedule_steps(cfg: TrainConfig, examples: list[dict], world: int) -> int:
    """Optimizer steps of the schedule: --max_steps, else --epochs passes over the training split. A split with
    no whole batch for every rank is a ConfigError (`fit` would look for a batch for ever)."""
    batches = len(multitask_batches(examples, cfg.micro_batch_size * world, cfg.split_seed, 0, drop_last=world > 1))
    if not batches:
        raise ConfigError("micro_batch_size", f"the training split has {len(examples)} records, fewer than one batch "
                          f"of --micro_batch_size {cfg.micro_batch_size} x {world} ranks = "
                          f"{cfg.micro_batch_size * world}; lower --micro_batch_size or give it more records")
    return cfg.max_steps or max(1, cfg.epochs * batches // cfg.grad_accum)


def _model_with_method(cfg: TrainConfig, ds_config: dict) -> tuple[torch.nn.Module, methods.MethodOptions]:
    """The base model in the training dtype, with --method added (and activation checkpointing if asked), and
    the method's knobs. Under ZeRO-3 the backbone is built partitioned (each rank holds its share only); the
    method's modules, sized from model.config, are partitioned by deepspeed.initialize. A quantized base
    computes in the training dtype."""
    if cfg.quantization != "none" and zero_stage(ds_config) == 3:
        raise ConfigError("quantization", f"{cfg.quantization} needs ZeRO stage 0-2: ZeRO-3 would partition the "
                          "packed weights (2 ranks hang); use --zero_stage 2 and no ZeRO-3 --deepspeed_config")
    with sharded_construction(ds_config):
        model = load_model(cfg.model, cfg.gguf_file, training_dtype(ds_config), cfg.revision, cfg.quantization)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
            model.config.use_cache = False
        options = methods.MethodOptions(**{f.name: getattr(cfg, f.name) for f in fields(methods.MethodOptions)})
        model = methods.prepare(model, cfg.method, options)  # peft asks transformers whether ZeRO-3 is on
    if hycam.is_applied(model):  # DeepSpeed's backward divides the loss by grad_accum; the balance term too
        hycam.set_gradient_accumulation(model, cfg.grad_accum)
    return model, options


def fit(run: Run, progress: Progress) -> str | None:
    """The loop; returns why it stopped, or None when --halt_after_steps cut it short."""
    cfg, start = run.cfg, time.time()
    run.interrupts.armed = True
    with tqdm(total=run.total, initial=progress.step, disable=run.rank != 0, desc=cfg.method,
              dynamic_ncols=True) as bar:  # closed on every way out, so messages start on a line of their own
        while True:
            batches = multitask_batches(run.splits["train"], cfg.micro_batch_size * run.world, cfg.split_seed,
                                        progress.epoch, drop_last=run.world > 1)
            for index in range(progress.batch, len(batches)):
                output = _micro_step(run, batches[index], progress)
                if progress.batch % cfg.grad_accum:
                    continue
                progress.step += 1
                _log_step(run, progress, output, bar, time.time() - start)
                done, why = _end_of_step(run, progress)
                if done:
                    return why
            progress.epoch, progress.batch = progress.epoch + 1, 0


def _micro_step(run: Run, examples: list[dict], progress: Progress):
    """Forward and backward of this rank's share of one micro-batch of every rank; the engine steps the
    optimizer on the last micro-batch of an optimizer step."""
    cfg = run.cfg
    if progress.batch % cfg.grad_accum == 0:  # a new optimizer step: its own routing noise
        torch.manual_seed(cfg.seed * 1_000_003 + progress.step * 101 + run.rank)
    mine = examples[run.rank * cfg.micro_batch_size : (run.rank + 1) * cfg.micro_batch_size]
    batch = collate(mine, run.meta["pad_id"])
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
                         f"stopping. {checkpoints.kept(run.out)}")
    run.signum = run.signum or int(flags[1].item())


def _log_step(run: Run, progress: Progress, output, bar: tqdm, seconds: float) -> None:
    task, balance = _item(output.loss), _item(output.get("balance_loss"))
    coef = getattr(getattr(run.engine.module, "hycam_config", None), "balance_coef", 0.0)
    # loss: the objective trained (Eq. 13); task_loss: the model's output.loss; balance_loss: Eq. 10 unweighted
    record = {"step": progress.step, "split": "train", "loss": task if math.isnan(balance) else task + coef * balance,
              "task_loss": task, "balance_loss": balance,
              "lr": run.engine.get_lr()[0], "tokens_per_s": progress.tokens / seconds}
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", bal=f"{record['balance_loss']:.3f}",
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    if progress.step % run.cfg.log_interval == 0:
        run.metrics.write(record)


def _end_of_step(run: Run, progress: Progress) -> tuple[bool, str | None]:
    """After an optimizer step: validate when due, then save and stop on a signal, halt, or finish.
    Returns (stop the loop, why; None when halted)."""
    cfg = run.cfg
    evaluated = progress.step % cfg.eval_interval == 0 or progress.step >= run.total
    stop = validate(run, progress) if evaluated else None
    if progress.step >= run.total:
        stop = stop or "reached the last step"
    if run.signum and not stop:
        if not evaluated:
            checkpoints.save_resume(run, progress)
        raise Interrupted(run.signum, f"stopped by {signal_name(run.signum)} after step {progress.step}: its resume "
                                      f"state is in {run.out}/{RESUME}; continue with --resume true")
    if cfg.halt_after_steps is not None and progress.step >= cfg.halt_after_steps:
        run.log(f"halting after step {progress.step} as asked (--halt_after_steps): resume with --resume")
        return True, None
    return stop is not None, stop


def validate(run: Run, progress: Progress) -> str | None:
    """Validation loss, best checkpoint, resume state and early stopping; returns a reason to stop."""
    cfg = run.cfg
    batch_size = cfg.eval_batch_size or 2 * cfg.micro_batch_size
    result = validation_loss(run.engine, run.splits["validation"], batch_size, run.meta["pad_id"], run.rank, run.world)
    run.metrics.write({"step": progress.step, "split": "validation", **result})
    if not math.isfinite(result["loss"]):
        raise SystemExit(f"[hycam] the validation loss is {result['loss']} at step {progress.step}; stopping. "
                         f"{checkpoints.kept(run.out)}")
    run.log(f"step {progress.step}: validation loss {result['loss']:.4f} "
            + " ".join(f"{t}={v:.3f}" for t, v in result["tasks"].items()))
    if result["loss"] < progress.best:
        progress.best, progress.bad_evals = result["loss"], 0
        checkpoints.save_trained(run, BEST, {"step": progress.step, "validation_loss": result["loss"]})
    else:
        progress.bad_evals += 1
    checkpoints.save_resume(run, progress)
    if cfg.patience and progress.bad_evals >= cfg.patience:
        return f"early stopping: no better validation loss in {cfg.patience} evaluations"
    return None


def _finish(run: Run, progress: Progress, stop: str) -> None:
    """last/, the closing messages, and summary.json: the run is done."""
    checkpoints.save_trained(run, LAST, {"step": progress.step})
    run.log(f"stopped: {stop}. best validation loss {progress.best:.4f}; checkpoints in {run.out}/{BEST}, /{LAST}")
    run.log(f"evaluate it: {rundir.evaluate_command(run.out / BEST)}")
    if run.rank == 0:
        summary = progress.to_json() | {"stop": stop}
        (run.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def _item(value) -> float:
    return float("nan") if value is None else float(value.detach())


def cli(argv: list[str]) -> None:
    """main() for a shell: usage and data errors as one line with exit code 2, signals as 128 + signum."""
    atexit.unregister(leave_group)  # once, however often it is called in one process
    atexit.register(leave_group)  # at exit, not on return: an in-process caller may train again
    try:
        main(argv)
    except (ConfigError, DataError, rundir.RunDirError, StaleBuildLock) as err:
        say(f"main.py: error: {err}")
        sys.exit(2)
    except Interrupted as err:
        say(f"[hycam] {err}")
        sys.exit(128 + err.signum)
    except RuntimeError as err:
        why = lost_rank(err)
        if why is None:
            raise
        say(f"[hycam] rank {os.environ.get('RANK', 0)}: {why}; stopping. ({str(err).strip().splitlines()[0]})")
        sys.exit(1)
