"""Which records ``hycam-eval`` scores, and the account of them it prints and records.

Two cases, decided by ``--tasks``:

- no ``--tasks``: the run's own task files, and by default the run's test split, rebuilt as main.py
  made it (its ``max_records_per_task`` cap, seed and fold), so no training record is scored;
- ``--tasks FILES``: the user's own test data, scored whole by default (every record, no split, no
  training cap). Asking for a split (``--split test``) rebuilds the run's split of those files,
  cap included; ``--limit`` keeps each task's first records either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hycam.data import DataError, Record, first_per_task, load_sources, split_records

SPLITS = ("test", "validation", "train", "all")


class UsageError(Exception):
    """Input the evaluation cannot use (checkpoint, base model, task files, options): exit code 2."""


@dataclass
class EvalOptions:
    """How records are chosen, tokenised and decoded; each field has a CLI flag of the same name."""

    split: str | None = None
    """'test', 'validation' or 'train' of the run's split, or 'all' records; None: 'all' with --tasks, else 'test'."""
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
    """From the run, no flag: main.py keeps each task's first N records (file order) before splitting;
    applied only where the run's split is rebuilt (not to --tasks files scored whole)."""
    fold: int | None = None
    """From the run, no flag: the cross-validation fold that is the test part (None: a 7:2:1 split)."""
    num_folds: int = 5
    """From the run, no flag: the number of cross-validation folds."""


def resolve_options(options: EvalOptions, recorded: dict, source: str | Path, tasks_given: bool = False) -> EvalOptions:
    """Fills the options left None, and the split's settings, from what the run recorded."""
    split = options.split or ("all" if tasks_given else "test")
    seed = options.seed if options.seed is not None else split_seed(recorded)
    if seed is None and split != "all":
        raise UsageError(f"{source}: no split seed is recorded; pass --seed to build the {split} split")
    cap = None if tasks_given and split == "all" else recorded.get("max_records_per_task")
    return EvalOptions(**{**asdict(options), "split": split, "seed": seed,
                          "template": options.template or recorded.get("template", "auto"),
                          "max_length": options.max_length or recorded.get("max_length", 1200),
                          "max_records_per_task": cap,
                          "fold": recorded.get("fold"), "num_folds": recorded.get("num_folds", 5)})


def task_files(args_tasks: list[str] | None, recorded: dict) -> list[str]:
    """``--tasks`` if given, else the run's recorded ``--data``."""
    if args_tasks:
        return args_tasks
    if not recorded.get("data"):
        raise UsageError("the run's task files are not recorded; pass --tasks")
    return list(recorded["data"])


def split_seed(recorded: dict) -> int | None:
    """The seed of the run's split and data order: its data_seed where set (a paired study), else its seed."""
    return recorded["data_seed"] if recorded.get("data_seed") is not None else recorded.get("seed")


def read_tasks(files: list[str], recorded: dict | None = None) -> list[Record]:
    """Every record of the task sources, or a UsageError naming the file and line at fault.

    ``synthetic`` is generated as the run generated it (its seed and record cap)."""
    recorded = recorded or {}
    try:
        return load_sources(files, seed=split_seed(recorded) or 0,
                            synthetic_per_task=recorded.get("max_records_per_task") or 200)
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


def trained_on(files: list[str], recorded: dict) -> list[str]:
    """The items of ``files`` that are, or lie in, the run's own ``--data`` (paths as seen from here)."""
    trained = [Path(item).resolve() for item in recorded.get("data") or [] if Path(item).exists()]
    return [item for item in files if Path(item).exists() and
            any(Path(item).resolve() == t or t in Path(item).resolve().parents for t in trained)]


def scored(files: list[str], by_task: dict[str, list[Record]], options: EvalOptions) -> dict:
    """What is scored, for results.json: the sources, how records were chosen, and how many per task."""
    sources = [item if not Path(item).exists() else str(Path(item).resolve()) for item in files]
    return {"files": sources, "split": options.split, "seed": None if options.split == "all" else options.seed,
            "max_records_per_task": options.max_records_per_task, "limit": options.limit,
            "records": {task: len(task_records) for task, task_records in by_task.items()}}


def describe(account: dict) -> str:
    """``scored``'s record as one line: '120 records of 2 tasks (a 100, b 20) from F: all records, ...'."""
    counts = account["records"]
    how = ["all records, no split" if account["split"] == "all"
           else f"the run's {account['split']} split (seed {account['seed']})"]
    if account["max_records_per_task"] is not None:
        how.append(f"the first {account['max_records_per_task']} records per task before splitting (the run's cap)")
    elif account["split"] == "all":
        how.append("no record cap")
    if account["limit"] is not None:
        how.append(f"at most {account['limit']} per task (--limit)")
    tasks = ", ".join(f"{task} {n}" for task, n in counts.items())
    return (f"{sum(counts.values())} records of {len(counts)} task{'s' * (len(counts) != 1)} ({tasks}) "
            f"from {', '.join(account['files'])}: {', '.join(how)}")
