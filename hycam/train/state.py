"""What the training loop reads (`Run`) and where it is (`Progress`, saved with every resume state)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hycam.baselines.methods import MethodOptions
from hycam.train.config import TrainConfig
from hycam.train.guards import Interrupts
from hycam.train.metrics import MetricsLog


@dataclass
class Progress:
    """Where the run is; saved with every resume state."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Passes over the training split begun before this one."""
    batch: int = 0
    """Micro-batches of this epoch done."""
    best: float = math.inf
    """The best validation loss so far."""
    bad_evals: int = 0
    """Evaluations since the best one."""
    tokens: int = 0
    """Tokens (non-padding, all ranks) trained on."""

    def to_json(self) -> dict:
        """As JSON holds it: no best loss yet is null, not Infinity."""
        return {**asdict(self), "best": self.best if math.isfinite(self.best) else None}

    @classmethod
    def from_json(cls, saved: dict) -> "Progress":
        return cls(**{**saved, "best": math.inf if saved["best"] is None else saved["best"]})


@dataclass
class Run:
    """What every part of the loop reads."""

    cfg: TrainConfig
    """The run's options."""
    rank: int
    """This process's rank."""
    world: int
    """Number of processes."""
    engine: Any
    """The DeepSpeed engine around the model with its method."""
    options: MethodOptions
    """The method's knobs, recorded in every checkpoint's method.json."""
    splits: dict[str, list[dict]]
    """Tokenised 'train' and 'validation' examples."""
    meta: dict
    """Recorded in every checkpoint's method.json: base model, seeds, template, pad id."""
    total: int
    """Optimizer steps of the schedule."""
    log: Callable[[str], None]
    """Prints a message on rank 0; nothing on the others."""
    interrupts: Interrupts
    """The signal handlers: a signal asks the loop to save and stop."""
    metrics: MetricsLog | None = None
    """metrics.jsonl and TensorBoard (open while the loop runs)."""
    signum: int = 0
    """A signal some rank received: save and stop at the end of this step."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)
