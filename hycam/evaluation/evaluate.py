"""Evaluate a trained checkpoint of any method: PPL, BLEU-4 and ROUGE-L per task and averaged.

    hycam-eval --checkpoint runs/hycam-2333/best [--tasks ../shared/data] [--base-model DIR]

PPL is token-level per task: exp(summed NLL of every response token of the task / their number),
not a mean of per-sample perplexities (long answers weigh more, as in a language-model PPL).
BLEU-4 (corpus-level) and ROUGE-L score greedy generations against the reference outputs. The
average row is the unweighted mean over tasks of each task's number, as the paper reports
averages over its five tasks. `--split test` (the default) rebuilds the run's split as main.py
made it (the run's task files unless `--tasks` is given, its `max_records_per_task` cap, seed and
fold, from `run_config.json` beside the checkpoint and its `method.json`) and scores its test
part, so no training record is scored.
Results go to `results.json` (the record `hycam.evaluation.tables` reads), `results.md` and
`generations.jsonl` in `--output-dir`. Bad input exits with code 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from hycam.baselines import methods
from hycam.data import DataError, Record, first_per_task, load_records, prompt_ids, split_records, tokenize_record
from hycam.data.models import load_model, load_tokenizer
from hycam.evaluation import tables
from hycam.evaluation.generation import greedy_generate, record_nll
from hycam.evaluation.metrics import bleu4, perplexity, rouge_l

SPLITS = ("test", "validation", "train", "all")
RUN_CONFIG = "run_config.json"


class UsageError(Exception):
    """Input the evaluation cannot use (checkpoint, base model, task files, options): exit code 2."""


@dataclass
class EvalOptions:
    """How records are chosen, tokenised and decoded; each field has a CLI flag of the same name."""

    split: str = "test"
    """Which records: the run's 'test', 'validation' or 'train' split, or 'all' of them."""
    seed: int | None = None
    """Seed of split_records; None: the run's data_seed, else its seed (method.json or run_config.json)."""
    template: str | None = None
    """Prompt template; None: the run's, else 'auto'."""
    max_length: int | None = None
    """Max tokens of prompt + response for PPL; None: the run's, else 1200 (the paper's)."""
    max_new_tokens: int = 128
    """Generation budget per record."""
    batch_size: int = 8
    """Records per forward pass, for PPL and for generation."""
    limit: int | None = None
    """At most this many records per task (the split's first ones)."""
    generate_limit: int | None = None
    """Of those, at most this many per task (the first ones) are generated for BLEU-4 and ROUGE-L; None: all."""
    progress: bool = True
    """Show progress bars on stderr."""
    max_records_per_task: int | None = None
    """From the run, no flag: main.py keeps each task's first N records (file order) before splitting."""
    fold: int | None = None
    """From the run, no flag: the cross-validation fold that is the test part (None: a 7:2:1 split)."""
    num_folds: int = 5
    """From the run, no flag: the number of cross-validation folds."""


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
            return {**json.loads((folder / RUN_CONFIG).read_text()), **meta}
    return meta


def resolve_options(options: EvalOptions, recorded: dict, checkpoint: str | Path) -> EvalOptions:
    """Fills the options left None, and the split's settings, from what the run recorded."""
    split_seed = recorded.get("data_seed") if recorded.get("data_seed") is not None else recorded.get("seed")
    seed = options.seed if options.seed is not None else split_seed
    if seed is None and options.split != "all":
        raise UsageError(f"{checkpoint}: the run's seed is not recorded; pass --seed to rebuild its "
                         f"{options.split} split")
    return EvalOptions(**{**asdict(options), "seed": seed,
                          "template": options.template or recorded.get("template", "auto"),
                          "max_length": options.max_length or recorded.get("max_length", 1200),
                          "max_records_per_task": recorded.get("max_records_per_task"),
                          "fold": recorded.get("fold"), "num_folds": recorded.get("num_folds", 5)})


def read_tasks(files: list[str]) -> list[Record]:
    """Every record of the task files, or a UsageError naming the file and line at fault."""
    try:
        return load_records(files)
    except DataError as err:
        raise UsageError(str(err)) from err


def select_records(records: list[Record], options: EvalOptions) -> dict[str, list[Record]]:
    """The records to score, by task, in split order; every task must keep at least one."""
    if options.limit is not None and options.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {options.limit}")
    if options.max_records_per_task is not None:
        # the subset main.py split under --max_records_per_task: another would leak training records
        records = first_per_task(records, options.max_records_per_task)
    chosen = records
    if options.split != "all":
        chosen = split_records(records, options.seed, fold=options.fold, num_folds=options.num_folds)[options.split]
    by_task: dict[str, list[Record]] = {task: [] for task in dict.fromkeys(r.task for r in records)}
    for record in chosen:
        by_task[record.task].append(record)
    for task, task_records in by_task.items():
        if not task_records:
            raise UsageError(f"task {task!r} has no records in the {options.split} split (seed {options.seed}): "
                             "no references to score against")
        by_task[task] = task_records[:options.limit]
    return by_task


def load_checkpoint(checkpoint: str, base_model: str | None, device: str) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, meta) of a trained checkpoint; a mismatch is a UsageError, not a traceback."""
    try:
        return load_trained(checkpoint, base_model, device)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load checkpoint {checkpoint} on base model {base_model or '(recorded)'}: "
                         f"{first_line}") from err


def load_trained(checkpoint: str | Path, base_model: str | None = None, device: str = "cpu"):
    """Rebuilds a trained model from a checkpoint dir of `main.py`: (model, tokenizer, meta)."""
    meta = methods.read_method(checkpoint)
    model_name = base_model or meta.get("model")
    if model_name is None:
        raise ValueError(f"{checkpoint}: the base model is not recorded; pass it explicitly")
    gguf = meta.get("gguf_file") if base_model is None else None
    model = methods.load_into(load_model(model_name, gguf), checkpoint)
    return model.to(device).eval(), load_tokenizer(model_name, gguf), meta


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
    by_task = select_records(records, options)
    torch.manual_seed(options.seed or 0)  # only noisy routing (eval_noise=True) draws from it
    metrics, generations, records = evaluate_records(model.eval(), tokenizer, by_task, options)
    result = {"method": method, "seed": options.seed, "split": options.split,
              "tasks": metrics, "average": average(metrics), "options": asdict(options), "records": records}
    return result, generations


def write_results(result: dict, generations: list[dict], output_dir: str | Path) -> str:
    """results.json, results.md (per-task and overall tables) and generations.jsonl; returns the tables."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = result if result["seed"] is not None else {**result, "seed": -1}
    markdown = (f"## Per task ({result['split']} split)\n\n{tables.markdown_per_task([record])}\n"
                f"## Averaged over tasks\n\n{tables.markdown_overall([record])}")
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    with (out / "generations.jsonl").open("w") as file:
        file.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hycam-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir written by main.py (e.g. RUN/best)")
    parser.add_argument("--tasks", nargs="+", default=None, help="task files or folders (default: the run's)")
    parser.add_argument("--base-model", default=None, help="base model dir, .gguf or name; default: the run's")
    parser.add_argument("--output-dir", default=None, help="default: CHECKPOINT/eval-SPLIT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label", default=None, help="method name in the tables (default: the checkpoint's)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="the run's split to score, or all records")
    for name, text in (("seed", "split seed (default: the run's)"), ("max_length", "PPL context (default: the run's)"),
                       ("max_new_tokens", "generation budget"), ("batch_size", "records per forward pass"),
                       ("limit", "at most this many records per task"),
                       ("generate_limit", "of those, at most this many generated per task (default: all)")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(EvalOptions, name), help=text)
    parser.add_argument("--template", choices=("auto", "chat", "plain", "authors"), default=None,
                        help="prompt template (default: the run's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def task_files(args_tasks: list[str] | None, recorded: dict) -> list[str]:
    if args_tasks:
        return args_tasks
    if not recorded.get("data"):
        raise UsageError("the run's task files are not recorded; pass --tasks")
    return list(recorded["data"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = EvalOptions.__dataclass_fields__
    options = EvalOptions(**{k: v for k, v in vars(args).items() if k in names})
    try:
        recorded = recorded_settings(args.checkpoint)
        options = resolve_options(options, recorded, args.checkpoint)
        files = task_files(args.tasks, recorded)
        records = read_tasks(files)  # before the model loads: a bad path fails fast
        model, tokenizer, _ = load_checkpoint(args.checkpoint, args.base_model, args.device)
        result, generations = evaluate(model, tokenizer, records, options, args.label or recorded["method"])
    except UsageError as err:
        print(f"hycam-eval: error: {err}", file=sys.stderr)
        return 2
    # "seed" names the run (its init), "split_seed" the records: they differ in a paired study (--data_seed).
    result.update(seed=recorded.get("seed", result["seed"]), split_seed=options.seed,
                  checkpoint=str(Path(args.checkpoint).resolve()), task_files=[str(Path(f).resolve()) for f in files],
                  base_model=args.base_model or recorded.get("model"))
    print(write_results(result, generations, args.output_dir or Path(args.checkpoint) / f"eval-{options.split}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
