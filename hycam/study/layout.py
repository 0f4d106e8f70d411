"""Where the study's files lie: the checkout it runs from, the names inside its directory, and how a file
lands there (whole or not at all)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout the study runs from: every unit runs in it, with its hycam and main.py."""

# The study directory: one folder per kind of unit, named for the run or unit it holds.
RUNS, EVAL, RETENTION, LOGS, FIGURES = "runs", "eval", "retention", "logs", "figures"
BASE_MODEL = "base_model"
"""The base model de-quantised once, where it is not a model directory already."""
SETTINGS = "settings.json"
PROVENANCE = "provenance.json"
COMMANDS = "commands.sh"
TIMINGS = "timings.jsonl"
GENERAL_TEXT = "general_text.jsonl"
"""The retention passages, written once so that every score reads the same."""
EXPERTS = "experts"
"""The expert-routing figure (.png) and its numbers (.json, written last: the figure's done marker)."""
REPORT = "RESULTS.md"
PREAMBLE = Path(__file__).with_name("results_preamble.md")
"""The hand-written text above a full study's report."""
MODEL_CONFIG = "config.json"
"""A transformers model directory's config: its presence means the directory is complete."""


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
