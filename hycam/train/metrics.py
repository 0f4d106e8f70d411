"""The run's metrics log (metrics.jsonl and TensorBoard) and its truncation on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hycam.files import METRICS

TENSORBOARD = "tensorboard"


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.file = self.board = None
        if not enabled:
            return
        self.file = (out_dir / METRICS).open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out_dir / TENSORBOARD))
        except ImportError:
            self.board = None

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = _json_safe(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.board is not None:
            self._add_scalars(record)

    def _add_scalars(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, float):
                self.board.add_scalar(f"{record['split']}/{key}", value, record["step"])
        for task, value in record.get("tasks", {}).items():
            if value is not None:
                self.board.add_scalar(f"{record['split']}/loss_{task}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines of metrics.jsonl logged after `step`, which a run resumed there logs again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _json_safe(value):
    """`value` with NaN and infinities as null: JSON has no number for them."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value
