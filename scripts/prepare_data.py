#!/usr/bin/env python
"""Download the paper's five tasks from their public sources and write them as task JSONL files.

    python scripts/prepare_data.py --out data/tasks [--tasks dolly webgpt] [--max-per-task 2000]

Writes ``{out}/{task}.jsonl``, one ``{"task", "instruction", "input", "output"}`` object a line,
which ``hycam.data.load_records`` reads. Text is kept as in the source; records are deduplicated
on (instruction, input), empty ones dropped, and a task with more than ``--max-per-task`` records
is sampled down by ``--seed`` (source order kept). The files in ../shared/data were made the same
way from the same sources (see its SOURCES.md), with about a tenth of each task held back.

Needs network access to GitHub: everything is downloaded before anything is written, and a
failed download stops the script with the URL and the reason. Offline, use ../shared/data or
``hycam.data.synthetic_tasks``. Sources are pinned to commits so the output does not drift.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ICLINIQ_ROWS = 107
"""Rows 0-106 of ChatDoctor's iCliniq set: the doctor-answered questions the paper's iCliniq task uses."""


class Source(NamedTuple):
    url: str
    parse: Callable[[str, str], list[dict]]
    """(downloaded text, task name) -> records."""


class SourceError(ValueError):
    """A downloaded file that is not in the shape its parser expects."""


def _record(task: str, instruction: object, input_text: object, output: object, where: str) -> dict:
    for name, value in (("instruction", instruction), ("input", input_text), ("output", output)):
        if not isinstance(value, str):
            raise SourceError(f"{task} {where}: {name} is {type(value).__name__}, not a string")
    return {"task": task, "instruction": instruction, "input": input_text, "output": output}


def _json_rows(text: str, task: str) -> list[tuple[str, dict]]:
    """(position, object) of each line of a JSON lines file."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{task} line {number}: malformed JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise SourceError(f"{task} line {number}: expected a JSON object")
        rows.append((f"line {number}", obj))
    return rows


def parse_alpaca(text: str, task: str) -> list[dict]:
    """A JSON array of {"instruction", "input", "output"} (Auto-CoT, CodeAlpaca, Dolly)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{task}: malformed JSON at line {err.lineno} ({err.msg})") from err
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise SourceError(f"{task}: expected a JSON array of objects")
    return [_record(task, item.get("instruction"), item.get("input", ""), item.get("output"), f"item {i}")
            for i, item in enumerate(items)]


def parse_webgpt(text: str, task: str) -> list[dict]:
    """JSON lines {"query", "snippets", "true_answer"}: the question and the better-rated answer."""
    return [_record(task, obj.get("query"), "", obj.get("true_answer"), where)
            for where, obj in _json_rows(text, task)]


def parse_icliniq(text: str, task: str, rows: int = ICLINIQ_ROWS) -> list[dict]:
    """JSON lines {"input", "answer_icliniq", ...}: a patient's question and the iCliniq doctor's answer."""
    return [_record(task, obj.get("input"), "", obj.get("answer_icliniq"), where)
            for where, obj in _json_rows(text, task)[:rows]]


_RAW = "https://raw.githubusercontent.com"
SOURCES: dict[str, Source] = {
    "autocot": Source(f"{_RAW}/Applied-Machine-Learning-Lab/HyCAM/8280ae488353adff54398ebb5d5053c6707018b2/"
                      "datasets/Auto-CoT/Auto-CoT.json", parse_alpaca),
    "codealpaca": Source(f"{_RAW}/sahil280114/codealpaca/0d265112c705f88848783dfdf9bdca9df64d8e35/"
                         "data/code_alpaca_2k.json", parse_alpaca),
    "dolly": Source(f"{_RAW}/sail-sg/sdft/10a06038c188df0f601d10e5ddab3dc8e19330e5/data/dolly/dolly_train.json",
                    parse_alpaca),
    "icliniq": Source(f"{_RAW}/ThatPham2000/medscore-lms/a5cf2292b80fb5378a373848b3c207ac27961359/"
                      "data/dataset_ChatDoctor-iCliniq/raw_data.jsonl", parse_icliniq),
    "webgpt": Source(f"{_RAW}/uSaiPrashanth/raithubot-training/be3d9482faf008bd9998c307cfcd98ab9a3c485f/"
                     "kcc_data/jsonlines/webgpt.jsonl", parse_webgpt),
}


def clean(records: list[dict], max_count: int | None, seed: int) -> list[dict]:
    """Drop records with an empty instruction or output and repeats of an (instruction, input);
    then keep a seeded sample of at most ``max_count``, in source order."""
    seen, kept = set(), []
    for record in records:
        key = (record["instruction"], record["input"])
        if record["instruction"].strip() and record["output"].strip() and key not in seen:
            seen.add(key)
            kept.append(record)
    if max_count is None or len(kept) <= max_count:
        return kept
    chosen = sorted(random.Random(seed).sample(range(len(kept)), max_count))
    return [kept[i] for i in chosen]


def fetch(url: str, timeout: float = 60.0) -> str:
    """The text at ``url``; any network failure becomes one clear error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8")
    except OSError as err:  # URLError, HTTPError, timeouts and resets are all OSErrors
        reason = getattr(err, "reason", err)
        raise ConnectionError(
            f"could not download {url} ({reason}). prepare_data.py needs network access to GitHub; "
            "offline, use the task files in ../shared/data or hycam.data.synthetic_tasks") from err


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the {task}.jsonl files")
    parser.add_argument("--tasks", nargs="+", choices=sorted(SOURCES), default=sorted(SOURCES))
    parser.add_argument("--max-per-task", type=int, default=2000, help="sample larger tasks down to this")
    parser.add_argument("--seed", type=int, default=2333, help="seed of that sample")
    args = parser.parse_args(argv)
    try:
        texts = {task: fetch(SOURCES[task].url) for task in args.tasks}
        prepared = {task: clean(SOURCES[task].parse(texts[task], task), args.max_per_task, args.seed)
                    for task in args.tasks}
    except (ConnectionError, SourceError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    for task, records in prepared.items():
        write_jsonl(records, args.out / f"{task}.jsonl")
        print(f"{task}: {len(records)} records -> {args.out / f'{task}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
