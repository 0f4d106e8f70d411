"""What ends a run cleanly instead of killing or hanging it: signals and stale build locks.

- ``Interrupts``: the first SIGINT/SIGTERM asks the loop to save its resume state at the next
  optimizer step and stop; a second one (or one before training started) stops at once.
- ``check_build_locks``: torch's C++-extension builder (which DeepSpeed uses for its ops) waits
  forever on a ``lock`` file a killed build left behind; a lock older than a few minutes with no
  build running stops the run naming the file instead.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StaleBuildLock(RuntimeError):
    """A torch-extensions build lock that no running build holds."""


class Interrupts:
    """Signal handlers for the block: `signum` is the first signal received once `armed`."""

    def __init__(self) -> None:
        self.armed, self.signum, self._previous = False, 0, {}

    def __enter__(self) -> "Interrupts":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum, f"stopped by {name} before training started: nothing to save")
        if self.signum:
            raise Interrupted(signum, f"stopped by a second signal ({name}) without saving: the last "
                                      "complete resume state is kept")
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def extensions_root() -> Path:
    """Where torch builds C++ extensions: $TORCH_EXTENSIONS_DIR, else its default cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def check_build_locks(minutes: float) -> None:
    """Raises StaleBuildLock naming a build lock older than `minutes` that no running build holds."""
    root, now = extensions_root(), time.time()
    # with $TORCH_EXTENSIONS_DIR the build folders sit in it; by default under py311_cpu/ and the like
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        changed = _mtime(lock)
        if changed is not None and changed < now - minutes * 60 and not _building(lock.parent, now - minutes * 60):
            raise StaleBuildLock(
                f"{lock}: a torch-extensions build lock {(now - changed) / 60:.0f} minutes old and no build running "
                f"in {lock.parent}; a killed first-run build of a DeepSpeed op leaves it, and every run would wait "
                f"on it forever: delete it (rm {lock}) and start again")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # its build just finished
        return None


def _building(directory: Path, since: float) -> bool:
    """A file of the build changed since `since`, or a process works in its directory (ninja, the compiler)."""
    if any((_mtime(p) or 0) > since for p in directory.iterdir() if p.name != "lock"):
        return True
    directory = directory.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(directory):
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False
