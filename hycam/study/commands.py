"""The command line of each kind of unit: what the study runs, as a researcher would type it."""

from __future__ import annotations

import sys
from pathlib import Path

from hycam.study.runs import Run
from hycam.study.settings import Settings


def train(s: Settings, model: str, run: Run, out: Path) -> list[str]:
    """main.py at the study's token budget, validation every `eval_interval` steps, no early stopping."""
    argv = [sys.executable, "main.py", "--model", model, "--data", s.data, "--method", run.method,
            "--seed", str(run.seed), "--data_seed", str(s.data_seed), "--lr", f"{run.lr:g}", "--output_dir", str(out),
            "--max_steps", str(s.steps), "--eval_interval", str(s.eval_interval), "--max_length", str(s.max_length),
            "--micro_batch_size", str(s.micro_batch_size), "--grad_accum", str(s.grad_accum),
            "--max_eval_records_per_task", str(s.val_records), "--patience", "0", "--warmup_ratio", "0.1",
            "--bf16", "false", "--log_interval", "1"]
    return argv + (["--max_records_per_task", str(s.max_records_per_task)] if s.max_records_per_task else [])


def evaluate(s: Settings, checkpoint: Path, method: str, out: Path) -> list[str]:
    """hycam.evaluation.evaluate on the test split: PPL on `test_records` per task, generation on the
    first `generate_records` of them."""
    return [sys.executable, "-m", "hycam.evaluation.evaluate", "--checkpoint", str(checkpoint),
            "--split", "test", "--limit", str(s.test_records), "--generate-limit", str(s.generate_records),
            "--max-new-tokens", str(s.max_new_tokens), "--batch-size", str(s.eval_batch_size), "--label",
            method, "--no-progress", "--output-dir", str(out)]


def general_texts(s: Settings, out: Path) -> list[str]:
    return [sys.executable, "-m", "hycam.evaluation.retention", "texts", "--count", str(s.retention_passages),
            "--out", str(out)]


def retention(s: Settings, texts: Path, model: list[str], out: Path) -> list[str]:
    """NLL on the general text of `model`: `--checkpoint CKPT --label METHOD` or `--base-model MODEL`."""
    return [sys.executable, "-m", "hycam.evaluation.retention", "score", "--texts", str(texts), *model,
            "--max-length", str(s.retention_tokens), "--batch-size", str(s.eval_batch_size), "--out", str(out)]


def experts(s: Settings, checkpoint: Path, out: Path) -> list[str]:
    """Expert routing on the generated test records."""
    return [sys.executable, "scripts/plot.py", "experts", "--checkpoint", str(checkpoint),
            "--limit", str(s.generate_records), "--batch-size", str(s.eval_batch_size), "--out", str(out)]
