"""Where task records come from: what ``--data`` (main.py) and ``--tasks`` (hycam-eval) accept.

Each item is one of:

- a task file or a folder of them (``records.load_records``: JSON lines or Alpaca JSON arrays, checked
  line by line);
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), read with
  ``datasets.load_from_disk``; every split's rows in the saved order, checked row by row like a file;
- ``hub:NAME``: the Hugging Face Hub dataset ``NAME`` (``datasets.load_dataset``, needs the network);
- ``synthetic``: the project's generated five-task set (``records.synthetic_tasks``).

A missing path is an error naming it: nothing is skipped or replaced silently. Records keep the
order of the items and, within one, the order of its rows, so the seeded split sees the same
records whatever their source.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from hycam.data.records import DataError, Record, load_records, synthetic_tasks, to_record

SYNTHETIC = "synthetic"
"""The ``--data`` item that stands for the generated five-task set."""
HUB_PREFIX = "hub:"
"""Prefix of a Hugging Face Hub dataset name; without it a name is a path, so a typo is never looked up."""
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict / a Dataset


def load_sources(items: Sequence[str | Path], seed: int = 0, synthetic_per_task: int = 200) -> list[Record]:
    """Every record of the items, in order; ``seed`` and ``synthetic_per_task`` size the generated set."""
    if isinstance(items, (str, Path)) or not items:
        raise DataError(f"expected a list of data sources (files, folders, saved datasets, hub:NAME or "
                        f"{SYNTHETIC}); got {items!r}")
    missing = [str(item) for item in items if _is_missing(str(item))]
    if missing:  # every missing path at once: a list of typos is fixed in one go
        raise DataError(f"{', '.join(missing)}: no such file or folder (the generated tasks are '{SYNTHETIC}', "
                        f"a Hub dataset is '{HUB_PREFIX}NAME')")
    records: list[Record] = []
    for item in items:
        records.extend(_read_source(str(item), seed, synthetic_per_task))
    return records


def _is_missing(item: str) -> bool:
    return item != SYNTHETIC and not item.startswith(HUB_PREFIX) and not Path(item).exists()


def _read_source(item: str, seed: int, synthetic_per_task: int) -> list[Record]:
    if item == SYNTHETIC:
        return synthetic_tasks(synthetic_per_task, seed)
    if item.startswith(HUB_PREFIX):
        return _read_hub(item[len(HUB_PREFIX):])
    path = Path(item)
    if is_saved_dataset(path):
        return _read_saved(path)
    return load_records(path)


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder that ``datasets``' ``save_to_disk`` wrote."""
    return Path(path).is_dir() and any((Path(path) / marker).is_file() for marker in _SAVED_MARKERS)


def _read_saved(path: Path) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable saved dataset ({_first_line(err)})") from err
    return _dataset_records(loaded, str(path), path.name)


def _read_hub(name: str) -> list[Record]:
    import datasets

    if not name:
        raise DataError(f"{HUB_PREFIX}: no dataset name after the prefix")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the Hub client raises many kinds (offline, not found, gated, bad config)
        raise DataError(f"{HUB_PREFIX}{name}: cannot load it from the Hugging Face Hub "
                        f"({type(err).__name__}: {_first_line(err)})") from err
    return _dataset_records(loaded, f"{HUB_PREFIX}{name}", name.rsplit("/", 1)[-1])


def _dataset_records(loaded, where: str, default_task: str) -> list[Record]:
    """The rows of a Dataset, or of every split of a DatasetDict in its order, as checked records."""
    splits = loaded.items() if hasattr(loaded, "keys") else [(None, loaded)]
    records: list[Record] = []
    for split, dataset in splits:
        place = where if split is None else f"{where} [{split}]"
        records.extend(_rows(dataset, place, default_task))
    if not records:
        raise DataError(f"{where}: the dataset has no rows, no records")
    return records


def _rows(rows: Iterable[dict], place: str, default_task: str) -> Iterable[Record]:
    for number, row in enumerate(rows):
        yield to_record(row, f"{place}, row {number}", default_task)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
