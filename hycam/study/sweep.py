"""The learning-rate sweep's rule: a family's grid grows past whichever edge has the lowest validation loss,
so that the chosen LR lies inside it."""

from __future__ import annotations

import math
from collections.abc import Callable


def beyond(edge: float, inner: float) -> float:
    """One step of the grid's ratio past `edge`, away from its neighbour `inner` (3 significant digits)."""
    return float(f"{edge * edge / inner:.3g}")


def extended_grid(lrs: list[float], loss_at: Callable[[float], float | None], extensions: int) -> list[float]:
    """The grid, extended by one point past whichever edge has the lowest validation loss (`loss_at`: None
    while not finished, inf if diverged), once per finished round, at most `extensions` times."""
    lrs = sorted(lrs)
    for _ in range(extensions if len(lrs) > 1 else 0):
        losses = [loss_at(lr) for lr in lrs]
        if None in losses or min(losses) == math.inf:
            break
        best = losses.index(min(losses))
        if best == 0:
            lrs.insert(0, beyond(lrs[0], lrs[1]))
        elif best == len(lrs) - 1:
            lrs.append(beyond(lrs[-1], lrs[-2]))
        else:
            break
    return lrs


def chosen_lr(losses: dict[float, float | None]) -> float | None:
    """The LR of the lowest loss once every point has finished, unless all diverged."""
    if any(value is None for value in losses.values()) or min(losses.values()) == math.inf:
        return None
    return min(losses, key=losses.get)
