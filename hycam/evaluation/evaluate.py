"""Evaluate a trained checkpoint of any method, or the base model: PPL, BLEU-4 and ROUGE-L per task.

    hycam-eval --checkpoint runs/hycam-2333/best [--tasks MY_TEST_FILES] [--base-model DIR]
    hycam-eval --base-model DIR --tasks MY_TEST_FILES --output-dir eval/base

Without `--tasks` the run's own test split is scored, rebuilt as main.py made it (its task files,
`max_records_per_task` cap, seed and fold, from `run_config.json` beside the checkpoint and its
`method.json`), so no training record is scored. Files given with `--tasks` are scored whole unless
`--split` or `--limit` asks otherwise (`selection`). Without `--checkpoint`, `--base-model` is scored
untrained, with the same prompts, tokenisation and decoding (`loading`); what is measured and how is
`scoring`'s. What is scored is printed first and recorded in `results.json` ("scored").
Results go to `results.json` (the record `hycam.evaluation.tables` reads), `results.md` and
`generations.jsonl` in `--output-dir`, which is locked (as `main.py` locks its run folder) before
anything is scored: a folder that cannot be written, or that another evaluation holds, fails first.
Bad input exits with code 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hycam import files
from hycam.data import DataError, Record
from hycam.data.models import QUANTIZATIONS
from hycam.folders import FolderError, lock
from hycam.data.prompts import TEMPLATES
from hycam.evaluation import tables
from hycam.evaluation.loading import Checkpoint, load_model_for, read_checkpoint
from hycam.evaluation.precision import bf16_is_fast
from hycam.evaluation.scoring import average, score, skipped_note
from hycam.evaluation.selection import (SPLITS, EvalOptions, UsageError, describe, read_tasks, resolve_options,
                                        scored, select_records, task_files, trained_on)

DTYPES = ("auto", "float32", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with exit code 2, like every other error of bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hycam-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir written by main.py (e.g. RUN/best); "
                        "without it, --base-model is scored untrained")
    parser.add_argument("--tasks", nargs="+", default=None, help="your test data, scored whole: task files or "
                        "folders, saved datasets, hub:NAME (default: the run's, its test split)")
    parser.add_argument("--base-model", default=None, help="base model dir, .gguf, name or hub id; default: the run's")
    parser.add_argument("--revision", default=None, help="revision of a hub --base-model; default: the run's")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="load the base in bitsandbytes 4-bit or 8-bit; default: as the run did, else none")
    parser.add_argument("--output-dir", default=None, help="default: CHECKPOINT/eval-SPLIT, or eval-base-SPLIT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: bfloat16 where the device computes it in hardware (hycam.evaluation.precision), "
                             "else float32; PPL in bfloat16 is within 1%% of float32's "
                             "(tests/evaluation/test_evaluate.py)")
    parser.add_argument("--label", default=None, help="method name in the tables (default: the checkpoint's, or base)")
    parser.add_argument("--split", choices=SPLITS, default=None, help="the run's split to score, or all records "
                        "(default: all of --tasks, else the run's test split)")
    for name, text in (("seed", "split seed (default: the run's)"), ("max_length", "PPL context (default: the run's)"),
                       ("max_new_tokens", "generation budget"), ("batch_size", "records per forward pass"),
                       ("limit", "at most this many records per task"),
                       ("generate_limit", "of those, at most this many generated per task (default: all)")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(EvalOptions, name), help=text)
    parser.add_argument("--template", choices=TEMPLATES, default=None,
                        help="prompt template (default: the run's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = EvalOptions(**{k: v for k, v in vars(args).items() if k in EvalOptions.__dataclass_fields__})
    try:
        chosen = plan(args.checkpoint, args.base_model, args.tasks, options)
        out = Path(args.output_dir or default_output_dir(args.checkpoint, chosen.options.split))
        with output_folder(out):  # before scoring: a folder it cannot write fails fast
            result, generations = execute(chosen, args.device, args.dtype, args.label, args.revision,
                                          args.quantization)
            report(result, generations, out)
    except (UsageError, DataError, FolderError) as err:
        print(f"hycam-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


@contextmanager
def output_folder(out: Path):
    """Holds `out`'s lock for the block (`hycam.folders.lock`: made if needed, writable, not in use); a
    folder made here for an evaluation that failed is removed again."""
    made = not out.exists()
    with closing(lock(out, "--output-dir")):
        try:
            yield
        except BaseException:
            if made:
                shutil.rmtree(out, ignore_errors=True)
            raise


@dataclass(frozen=True)
class Plan:
    """What an evaluation will score, read and checked before any model loads."""

    checkpoint: Checkpoint | None
    """The checkpoint read (None: the untrained base model)."""
    base_model: str | None
    """--base-model, if given."""
    options: EvalOptions
    """The options, filled from what the run recorded."""
    by_task: dict[str, list[Record]]
    """The records to score, by task."""
    account: dict
    """What is scored, as results.json records it ("scored")."""


def plan(checkpoint: str | None, base_model: str | None, tasks: list[str] | None, options: EvalOptions) -> Plan:
    """The records chosen and described, from the checkpoint's record of its run: bad input fails here."""
    if checkpoint is None and (base_model is None or not tasks):
        raise UsageError("pass --checkpoint RUN/best (a trained run), or --base-model MODEL with --tasks FILES "
                         "(the untrained base model)")
    found = read_checkpoint(checkpoint) if checkpoint else None
    recorded = found.recorded if found else {}
    options = resolve_options(options, recorded, checkpoint or f"--base-model {base_model}", bool(tasks))
    sources = task_files(tasks, recorded)
    by_task = select_records(read_tasks(sources, recorded), options)
    account = scored(sources, by_task, options)
    announce(account, trained_on(sources, recorded) if tasks and options.split == "all" else [])
    return Plan(found, base_model, options, by_task, account)


def run(checkpoint: str | None, base_model: str | None, tasks: list[str] | None, options: EvalOptions,
        device: str = "cpu", dtype: str = "auto", label: str | None = None, revision: str | None = None,
        quantization: str | None = None) -> tuple[dict, list[dict]]:
    """The command's work: records chosen and described, the model loaded, everything scored; returns the
    result record (`hycam.evaluation.tables`' format, plus what produced it) and the generations."""
    return execute(plan(checkpoint, base_model, tasks, options), device, dtype, label, revision, quantization)


def execute(chosen: Plan, device: str = "cpu", dtype: str = "auto", label: str | None = None,
            revision: str | None = None, quantization: str | None = None) -> tuple[dict, list[dict]]:
    """Loads the model (`revision` and `quantization` of the base: default the run's) and scores the plan's
    records; returns the result record and the generations."""
    found, options = chosen.checkpoint, chosen.options
    recorded = found.recorded if found else {}
    torch_dtype = eval_dtype(dtype, device)
    model, tokenizer = load_model_for(found, chosen.base_model, device, torch_dtype, revision, quantization)
    torch.manual_seed(options.seed if options.seed is not None else 0)  # only noisy routing (eval_noise) draws
    metrics, generations, records = score(model, tokenizer, chosen.by_task, options)
    skipped = skipped_note(metrics, options, model)
    if skipped:
        print(f"hycam-eval: note: {skipped}", flush=True)
    # "seed" names the run (its init), "split_seed" the records: they differ in a paired study (--data_seed).
    # Without a recorded seed it is the split's, else 0 (tables need an int).
    result = {"method": label or recorded.get("method", "base"),
              "seed": recorded.get("seed", options.seed if options.seed is not None else 0), "split": options.split,
              "tasks": metrics, "average": average(metrics), "options": asdict(options), "records": records,
              "split_seed": options.seed, "scored": chosen.account, "dtype": str(torch_dtype).removeprefix("torch."),
              "checkpoint": str(found.path.resolve()) if found else None,
              "task_files": chosen.account["files"], "base_model": chosen.base_model or recorded.get("model"),
              "skipped": skipped,
              "quantization": quantization or recorded.get("quantization", "none")}
    return result, generations


def eval_dtype(name: str, device: str) -> torch.dtype:
    """`--dtype`: auto is bfloat16 where `device` computes it in hardware, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, name)


def announce(account: dict, trained_files: list[str]) -> None:
    """Says what is about to be scored, before the slow part, and when the user's files were trained on."""
    print(f"hycam-eval: scoring {describe(account)}", flush=True)
    if trained_files:
        print(f"hycam-eval: note: {', '.join(trained_files)}: the run's training data, scored whole (--split test "
              "scores only the run's test split)", flush=True)


def default_output_dir(checkpoint: str | Path | None, split: str) -> Path:
    """CHECKPOINT/eval-SPLIT, or eval-base-SPLIT in the working directory for the base model."""
    return Path(checkpoint) / f"eval-{split}" if checkpoint else Path(f"eval-base-{split}")


def report(result: dict, generations: list[dict], output_dir: str | Path) -> None:
    """Writes the results to `output_dir`, prints the tables on stdout and where they went on stderr."""
    print(write_results(result, generations, output_dir))
    print(f"hycam-eval: wrote {files.RESULTS}, {files.RESULTS_MD} and {files.GENERATIONS} to {output_dir}",
          file=sys.stderr)


def write_results(result: dict, generations: list[dict], output_dir: str | Path) -> str:
    """results.json, results.md (per-task and overall tables) and generations.jsonl; returns the tables."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored_line = f"Scored: {describe(result['scored'])}\n\n" if "scored" in result else ""
    scored_line += f"Skipped: {result['skipped']}\n\n" if result.get("skipped") else ""
    part = "all records" if result["split"] == "all" else f"{result['split']} split"
    markdown = (f"{scored_line}## Per task ({part})\n\n{tables.markdown_per_task([result])}\n"
                f"## Averaged over tasks\n\n{tables.markdown_overall([result])}")
    (out / files.RESULTS).write_text(json.dumps(result, indent=2) + "\n")
    (out / files.RESULTS_MD).write_text(markdown)
    with (out / files.GENERATIONS).open("w") as file:
        file.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return markdown


if __name__ == "__main__":
    sys.exit(main())
