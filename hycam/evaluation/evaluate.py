"""Evaluate a trained checkpoint of any method, or the base model: PPL, BLEU-4 and ROUGE-L per task.

    hycam-eval --checkpoint runs/hycam-2333/best [--tasks MY_TEST_FILES] [--base-model DIR]
    hycam-eval --base-model DIR --tasks MY_TEST_FILES --output-dir eval/base

PPL is token-level per task: exp(summed NLL of every response token of the task / their number),
not a mean of per-sample perplexities (long answers weigh more, as in a language-model PPL).
BLEU-4 (corpus-level) and ROUGE-L score greedy generations against the reference outputs. The
average row is the unweighted mean over tasks of each task's number, as the paper reports
averages over its five tasks. Without `--tasks` the run's own test split is scored, rebuilt as
main.py made it (its task files, `max_records_per_task` cap, seed and fold, from `run_config.json`
beside the checkpoint and its `method.json`), so no training record is scored. Files given with
`--tasks` are scored whole unless `--split` or `--limit` asks otherwise (`selection`). Without
`--checkpoint`, `--base-model` is scored untrained, with the same prompts, tokenisation and decoding.
What is scored is printed first and recorded in `results.json` ("scored").
Results go to `results.json` (the record `hycam.evaluation.tables` reads), `results.md` and
`generations.jsonl` in `--output-dir`. Bad input exits with code 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from hycam.baselines import methods
from hycam.data import DataError, Record, prompt_ids, tokenize_record
from hycam.data.models import load_model, load_tokenizer, resolve
from hycam.evaluation import tables
from hycam.evaluation.selection import (SPLITS, EvalOptions, UsageError, describe, read_tasks, resolve_options,
                                        scored, select_records, task_files, trained_on)
from hycam.evaluation.generation import greedy_generate, record_nll
from hycam.evaluation.metrics import bleu4, perplexity, rouge_l
from hycam.precision import bf16_is_fast

RUN_CONFIG = "run_config.json"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with exit code 2, like every other error of bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def recorded_settings(checkpoint: str | Path) -> dict:
    """What the run recorded: its run_config.json (in the checkpoint dir or up to two levels above),
    overridden by the checkpoint's method.json; read without loading any model."""
    from hycam.baselines.methods import read_method

    here = Path(checkpoint).resolve()
    if not here.is_dir():
        raise UsageError(f"--checkpoint {checkpoint}: no such directory")
    try:
        meta = read_method(here)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err
    for folder in (here, here.parent, here.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            try:
                recorded = json.loads((folder / RUN_CONFIG).read_text())
            except ValueError as err:
                raise UsageError(f"{folder / RUN_CONFIG}: not valid JSON ({err})") from None
            return {**recorded, **meta}
    return meta


def load_checkpoint(checkpoint: str, base_model: str | None, device: str,
                    dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, meta) of a trained checkpoint; a mismatch is a UsageError, not a traceback."""
    try:
        return load_trained(checkpoint, base_model, device, dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load checkpoint {checkpoint} on base model {base_model or '(recorded)'}: "
                         f"{first_line}") from err


def load_trained(checkpoint: str | Path, base_model: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Rebuilds a trained model from a checkpoint dir of `main.py`: (model, tokenizer, meta).

    The base model is loaded in `dtype` before the method is added, so that the method's modules are
    built in it too (HyCAM's one-matmul inference needs its weights made in place, not cast later)."""
    meta = methods.read_method(checkpoint)
    model_name = base_model or meta.get("model")
    if model_name is None:
        raise ValueError(f"{checkpoint}: the base model is not recorded; pass it explicitly")
    gguf = meta.get("gguf_file") if base_model is None else None
    model = methods.load_into(_base_in(model_name, gguf, dtype), checkpoint)
    return model.to(device).eval(), load_tokenizer(model_name, gguf), meta


def _base_in(model_name: str, gguf: str | None, dtype: torch.dtype) -> nn.Module:
    # A GGUF file is de-quantised to float32 (transformers warns against asking it for another dtype).
    packed = resolve(model_name, gguf)[1] is not None
    return load_model(model_name, gguf).to(dtype) if packed else load_model(model_name, gguf, dtype=dtype)


def load_base(model_name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """The untrained base model and its tokenizer, loaded as under a checkpoint (same dtype and tokenizer)."""
    try:
        model, tokenizer = _base_in(model_name, None, dtype), load_tokenizer(model_name)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load base model {model_name}: {first_line}") from err
    return model.to(device).eval(), tokenizer


def stop_tokens(model: nn.Module, tokenizer) -> list[int]:
    """EOS of the tokenizer (what training appended) and of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *configured] if t is not None))


def evaluate_records(model: nn.Module, tokenizer, by_task: dict[str, list[Record]],
                     options: EvalOptions) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """Per-task metrics, every generation, and each scored record's response NLL (`score_records`: what
    paired comparisons of two runs on the same records resample), for records already chosen."""
    if options.generate_limit is not None and options.generate_limit < 1:
        raise UsageError(f"--generate-limit must be >= 1, got {options.generate_limit}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = score_records(model, tokenizer, [r for task_records in by_task.values() for r in task_records], pad,
                         options)
    nll = {task: (sum(x["nll"] for x in rows if x["task"] == task and x["nll"] is not None),
                  sum(x["tokens"] for x in rows if x["task"] == task)) for task in by_task}
    generated = [r for task_records in by_task.values() for r in task_records[:options.generate_limit]]
    prompts = [prompt_ids(r, tokenizer, options.template) for r in generated]
    outputs = greedy_generate(model, prompts, pad, stop_tokens(model, tokenizer), options.max_new_tokens,
                              options.batch_size, options.progress)
    predictions = [text.strip() for text in tokenizer.batch_decode(outputs, skip_special_tokens=True)]
    generations = [{"task": r.task, "instruction": r.instruction, "input": r.input, "reference": r.output,
                    "prediction": p} for r, p in zip(generated, predictions)]
    metrics = {task: {**task_metrics(task, generations, nll, options), "scored": len(by_task[task]),
                      "skipped": sum(x["nll"] is None for x in rows if x["task"] == task)} for task in by_task}
    return metrics, generations, rows


def score_records(model: nn.Module, tokenizer, records: list[Record], pad: int, options: EvalOptions) -> list[dict]:
    """Per record, in order: task, id, summed response NLL and response tokens (None, 0: prompt too long)."""
    try:
        examples = [tokenize_record(r, tokenizer, options.max_length, options.template) for r in records]
    except ValueError as err:  # a template the tokenizer lacks, a bad --max-length
        raise UsageError(str(err)) from err
    scores = iter(record_nll(model, [e for e in examples if e is not None], pad, options.batch_size,
                             options.progress))
    rows = []
    for record, example in zip(records, examples):
        total, tokens = next(scores) if example is not None else (None, 0)
        rows.append({"task": record.task, "id": record_id(record), "nll": total, "tokens": tokens})
    return rows


def record_id(record: Record) -> str:
    """A short hash of the record's text: paired comparisons check that two runs scored the same records."""
    text = "\x1f".join((record.task, record.instruction, record.input, record.output))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def task_metrics(task: str, generations: list[dict], nll: dict[str, tuple[float, int]],
                 options: EvalOptions) -> dict:
    """PPL over the task's response tokens; corpus BLEU-4 and mean ROUGE-L of its generations."""
    if not nll[task][1]:
        raise UsageError(f"task {task!r}: every prompt is longer than --max-length {options.max_length}")
    rows = [g for g in generations if g["task"] == task]
    predictions, references = [g["prediction"] for g in rows], [g["reference"].strip() for g in rows]
    return {"ppl": perplexity(*nll[task]), "bleu": bleu4(predictions, references),
            "rouge_l": rouge_l(predictions, references), "samples": len(rows), "response_tokens": nll[task][1]}


def average(metrics: dict[str, dict]) -> dict[str, float]:
    """Unweighted mean over tasks of each task's PPL, BLEU-4 and ROUGE-L."""
    return {m: statistics.fmean(values[m] for values in metrics.values()) for m in tables.METRICS}


def evaluate(model: nn.Module, tokenizer, records: list[Record], options: EvalOptions,
             method: str) -> tuple[dict, list[dict]]:
    """The result record (`hycam.evaluation.tables`' format, plus what produced it) and the generations."""
    return evaluate_selected(model, tokenizer, select_records(records, options), options, method)


def evaluate_selected(model: nn.Module, tokenizer, by_task: dict[str, list[Record]], options: EvalOptions,
                      method: str) -> tuple[dict, list[dict]]:
    """`evaluate` of records already chosen. The record's seed is the split's, else 0 (tables need an int)."""
    seed = options.seed if options.seed is not None else 0
    torch.manual_seed(seed)  # only noisy routing (eval_noise=True) draws from it
    metrics, generations, records = evaluate_records(model.eval(), tokenizer, by_task, options)
    result = {"method": method, "seed": seed, "split": options.split,
              "tasks": metrics, "average": average(metrics), "options": asdict(options), "records": records}
    return result, generations


def write_results(result: dict, generations: list[dict], output_dir: str | Path) -> str:
    """results.json, results.md (per-task and overall tables) and generations.jsonl; returns the tables."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored_line = f"Scored: {describe(result['scored'])}\n\n" if "scored" in result else ""
    part = "all records" if result["split"] == "all" else f"{result['split']} split"
    markdown = (f"{scored_line}## Per task ({part})\n\n{tables.markdown_per_task([result])}\n"
                f"## Averaged over tasks\n\n{tables.markdown_overall([result])}")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    with (out / "generations.jsonl").open("w") as file:
        file.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hycam-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir written by main.py (e.g. RUN/best); "
                        "without it, --base-model is scored untrained")
    parser.add_argument("--tasks", nargs="+", default=None, help="your test data, scored whole: task files or "
                        "folders, saved datasets, hub:NAME (default: the run's, its test split)")
    parser.add_argument("--base-model", default=None, help="base model dir, .gguf or name; default: the run's")
    parser.add_argument("--output-dir", default=None, help="default: CHECKPOINT/eval-SPLIT, or eval-base-SPLIT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 where the device computes it in hardware (hycam.precision), else "
                             "float32; PPL in bfloat16 is within 1%% of float32's (tests/evaluation/test_evaluate.py)")
    parser.add_argument("--label", default=None, help="method name in the tables (default: the checkpoint's, or base)")
    parser.add_argument("--split", choices=SPLITS, default=None, help="the run's split to score, or all records "
                        "(default: all of --tasks, else the run's test split)")
    for name, text in (("seed", "split seed (default: the run's)"), ("max_length", "PPL context (default: the run's)"),
                       ("max_new_tokens", "generation budget"), ("batch_size", "records per forward pass"),
                       ("limit", "at most this many records per task"),
                       ("generate_limit", "of those, at most this many generated per task (default: all)")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(EvalOptions, name), help=text)
    parser.add_argument("--template", choices=("auto", "chat", "plain", "authors"), default=None,
                        help="prompt template (default: the run's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def eval_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(args.device) else torch.float32
    return getattr(torch, args.dtype)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, generations = score(args)
    except (UsageError, DataError) as err:
        print(f"hycam-eval: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.checkpoint, result["split"])
    print(write_results(result, generations, out))
    print(f"hycam-eval: wrote results.json, results.md and generations.jsonl to {out}", file=sys.stderr)
    return 0


def default_output_dir(checkpoint: str | None, split: str) -> Path:
    """CHECKPOINT/eval-SPLIT, or eval-base-SPLIT in the working directory for the base model."""
    return Path(checkpoint) / f"eval-{split}" if checkpoint else Path(f"eval-base-{split}")


def announce(account: dict, trained_files: list[str]) -> None:
    """Says what is about to be scored, before the slow part, and when the user's files were trained on."""
    print(f"hycam-eval: scoring {describe(account)}", flush=True)
    if trained_files:
        print(f"hycam-eval: note: {', '.join(trained_files)}: the run's training data, scored whole (--split test "
              "scores only the run's test split)", flush=True)


def score(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """The command's work: records chosen and described, the model loaded, everything scored."""
    if args.checkpoint is None and (args.base_model is None or not args.tasks):
        raise UsageError("pass --checkpoint RUN/best (a trained run), or --base-model MODEL with --tasks FILES "
                         "(the untrained base model)")
    recorded = recorded_settings(args.checkpoint) if args.checkpoint else {}
    names = EvalOptions.__dataclass_fields__
    options = EvalOptions(**{k: v for k, v in vars(args).items() if k in names})
    options = resolve_options(options, recorded, args.checkpoint or f"--base-model {args.base_model}", bool(args.tasks))
    files = task_files(args.tasks, recorded)
    by_task = select_records(read_tasks(files, recorded), options)  # before the model loads: bad data fails fast
    account = scored(files, by_task, options)
    announce(account, trained_on(files, recorded) if args.tasks and options.split == "all" else [])
    dtype = eval_dtype(args)
    if args.checkpoint:
        model, tokenizer, _ = load_checkpoint(args.checkpoint, args.base_model, args.device, dtype)
    else:
        model, tokenizer = load_base(args.base_model, args.device, dtype)
    result, generations = evaluate_selected(model, tokenizer, by_task, options,
                                            args.label or recorded.get("method", "base"))
    # "seed" names the run (its init), "split_seed" the records: they differ in a paired study (--data_seed).
    result.update(seed=recorded.get("seed", result["seed"]), split_seed=options.seed,
                  scored=account, dtype=str(dtype).removeprefix("torch."),
                  checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                  task_files=account["files"], base_model=args.base_model or recorded.get("model"))
    return result, generations


if __name__ == "__main__":
    sys.exit(main())
