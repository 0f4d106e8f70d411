"""One training run of the study, named as its folders are."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    method: str
    """A method of `hycam.baselines.methods` (main.py --method)."""
    lr: float
    """Its learning rate."""
    seed: int
    """Adapter initialisation and routing noise (main.py --seed)."""

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"
