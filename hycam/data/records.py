"""Task records for multi-task fine-tuning: read and check them, split them, or make them.

A task file holds JSON lines ``{"task", "instruction", "input", "output"}`` (the project's format)
or one JSON array of ``{"instruction", "input", "output"}`` objects (the Alpaca format the authors
ship); a missing ``"task"`` is the file's stem. Bad data stops here, before any training, with a
``DataError`` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("task", "instruction", "input", "output")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Record:
    """One supervised example of one task; frozen so records can be hashed, compared and shared."""

    task: str
    instruction: str
    input: str
    output: str


class DataError(ValueError):
    """A task file that cannot be trained on; the message names the file and line."""


# ---- reading task files --------------------------------------------------------------------------

def load_records(paths: str | Path | Sequence[str | Path]) -> list[Record]:
    """Every record of the given task files and folders (a folder: its *.jsonl and *.json files)."""
    records: list[Record] = []
    for path in _task_files(paths):
        records.extend(_read_file(path))
    return records


def _task_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DataError("load_records: no paths given")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
            if not found:
                raise DataError(f"{item}: folder has no .jsonl or .json task files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return files


def _read_file(path: Path) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise DataError(f"{path}, line 1: empty file, no records")
    rows = _json_array(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    records = [to_record(obj, f"{path}, line {line}", path.stem) for line, obj in rows]
    if not records:
        raise DataError(f"{path}, line 1: the JSON array is empty, no records")
    return records


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, which splitlines breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: malformed JSON ({err.msg} at column {err.colno})") from err


def _json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """The array's elements with the line each starts on, so errors can point at them."""
    decoder, line, last = json.JSONDecoder(), 1, 0
    pos = _skip_space(text, text.index("[") + 1)
    while not text.startswith("]", pos):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
        line, last = line + text.count("\n", last, pos), pos
        yield line, obj
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            where = line + text.count("\n", last, pos)
            raise DataError(f"{path}, line {where}: malformed JSON array (expected ',' or ']')")
    if text[pos + 1:].strip():
        where = line + text.count("\n", last, pos)
        raise DataError(f"{path}, line {where}: text after the JSON array")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def to_record(obj: object, where: str, default_task: str) -> Record:
    """``obj`` checked as a record (extra keys are ignored); ``where`` starts every error message."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    values = {"task": default_task, **obj}
    for name in FIELDS:
        if name not in values:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(values[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {_json_type(values[name])}")
    for name in ("task", "instruction", "output"):
        if not values[name].strip():
            raise DataError(f"{where}: field {name!r} is empty")
    return Record(**{name: values[name] for name in FIELDS})


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- splits ---------------------------------------------------------------------------------------

def split_records(records: Sequence[Record], seed: int, ratios: Sequence[float] = (0.7, 0.2, 0.1),
                  fold: int | None = None, num_folds: int = 5) -> dict[str, list[Record]]:
    """Per-task train/validation/test split (paper: 7:2:1 with five-fold cross-validation).

    Each task's records are ordered by a hash of (seed, record), so the split depends on the seed
    and the records only, never on file or list order. ``fold=None``: cut by ``ratios`` (normalised;
    ``(0.7, 0.2, 0.0)`` is the authors' 7:2 split with no test set). ``fold=k``: the k-th of
    ``num_folds`` equal parts is the test set and the rest is cut into train and validation in the
    proportion ``ratios[0]:ratios[1]``; the folds' test sets partition each task.
    """
    weights = _check_split_args(ratios, fold, num_folds)
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.task].append(record)
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for task in sorted(groups):
        ordered = sorted(groups[task], key=lambda record: _order_key(seed, record))
        for name, part in _split_task(ordered, weights, fold, num_folds).items():
            splits[name].extend(part)
    return splits


def _check_split_args(ratios: Sequence[float], fold: int | None, num_folds: int) -> tuple[float, ...]:
    weights = tuple(float(r) for r in ratios)
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ValueError(f"ratios must be 3 numbers >= 0 (train, validation, test), train > 0; got {ratios!r}")
    if fold is not None and (not isinstance(num_folds, int) or num_folds < 2):
        raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
    if fold is not None and (not isinstance(fold, int) or not 0 <= fold < num_folds):
        raise ValueError(f"fold must be an int in [0, {num_folds}), got {fold!r}")
    return weights


def _order_key(seed: int, record: Record) -> bytes:
    text = "\x1f".join((str(seed), record.task, record.instruction, record.input, record.output))
    return hashlib.sha256(text.encode("utf-8")).digest()


def _split_task(ordered: list[Record], weights: tuple[float, ...], fold: int | None,
                num_folds: int) -> dict[str, list[Record]]:
    if fold is None:
        return _cut(ordered, weights)
    bounds = [round(i * len(ordered) / num_folds) for i in range(num_folds + 1)]
    rest = ordered[:bounds[fold]] + ordered[bounds[fold + 1]:]
    parts = _cut(rest, (weights[0], weights[1], 0.0))
    parts["test"] = ordered[bounds[fold]:bounds[fold + 1]]
    return parts


def _cut(ordered: list[Record], weights: tuple[float, ...]) -> dict[str, list[Record]]:
    total, n = sum(weights), len(ordered)
    train_end = round(n * weights[0] / total)
    validation_end = round(n * (weights[0] + weights[1]) / total)
    return {"train": ordered[:train_end], "validation": ordered[train_end:validation_end],
            "test": ordered[validation_end:]}


# ---- a small multi-task set the project makes itself ----------------------------------------------

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver",
          "candle", "forest", "window", "pepper", "mirror", "island", "jacket", "bottle", "dragon",
          "meadow", "orange", "pencil", "button", "castle")
_Maker = Callable[[random.Random], tuple[str, str, str]]


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
        steps = (f"Add the tens: {a // 10 * 10} + {b // 10 * 10} = {tens}. "
                 f"Add the ones: {a % 10} + {b % 10} = {ones}. Then {tens} + {ones} = {a + b}.")
        return f"What is {a} + {b}?", "", f"Let's think step by step. {steps} The answer is {a + b}."
    a, b = max(a, b), min(a, b)
    middle = a - b // 10 * 10
    steps = f"First take away the tens: {a} - {b // 10 * 10} = {middle}. Then the ones: {middle} - {b % 10} = {a - b}."
    return f"What is {a} - {b}?", "", f"Let's think step by step. {steps} The answer is {a - b}."


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    text = _words(rng, 1, 3)
    return "Reverse the characters of the text.", text, text[::-1]


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    return "Sort the numbers in ascending order.", ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _capitalize(rng: random.Random) -> tuple[str, str, str]:
    text = _words(rng, 2, 6)
    return "Capitalize the first letter of every word.", text, text.title()


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    text = _words(rng, 2, 9)
    return "How many words does the text have?", text, f"The text has {len(text.split())} words."


_SYNTHETIC: dict[str, _Maker] = {"arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort,
                                 "capitalize": _capitalize, "count_words": _count_words}


def synthetic_tasks(num_per_task: int, seed: int) -> list[Record]:
    """Five tiny tasks with checkable answers, so a run works without ../shared/data.

    Arithmetic with a step-by-step rationale (like Auto-CoT), string reversal, number sorting,
    capitalisation and word counting; records are distinct within a task and fixed by the seed
    (each task has its own generator, so adding a task changes no other).
    """
    if not isinstance(num_per_task, int) or num_per_task < 1:
        raise ValueError(f"num_per_task must be an int >= 1, got {num_per_task!r}")
    records: list[Record] = []
    for task, make in _SYNTHETIC.items():
        rng, found = random.Random(f"hycam-synthetic:{seed}:{task}"), {}
        for _ in range(50 * num_per_task):
            instruction, text, output = make(rng)
            found.setdefault((instruction, text), Record(task, instruction, text, output))
            if len(found) == num_per_task:
                break
        else:
            raise ValueError(f"synthetic_tasks: cannot make {num_per_task} distinct {task!r} records")
        records.extend(found.values())
    return records


def first_per_task(records: Sequence[Record], limit: int) -> list[Record]:
    """The first `limit` records of each task, in the given order (so not dependent on a seed)."""
    seen: Counter = Counter()
    kept = []
    for record in records:
        seen[record.task] += 1
        if seen[record.task] <= limit:
            kept.append(record)
    return kept
