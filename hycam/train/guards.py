"""What ends a run cleanly instead of killing or hanging it: signals and stale build locks.

- ``leave_group``: the process group is left at exit before the C++ teardown could abort it.
- ``Interrupts``: the first SIGINT/SIGTERM asks the loop to save its resume state at the next
  optimizer step and stop; a second one (or one before training started) stops at once.
- ``check_build_locks``: torch's C++-extension builder (which DeepSpeed uses for its ops) waits
  forever on a ``lock`` file a killed build left behind. The builder keeps the lock open while it
  builds (torch's ``FileBaton``), so a lock that no process holds is a dead build's, whatever its
  age: the run stops naming the file. Only while files of its folder are still being written (a
  build on another machine sharing the folder) is it waited on, saying so, until the writing stops
  or the lock is ``--stale_lock_minutes`` old.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

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


QUIET_SECONDS = 30
"""A lock nobody holds whose folder was written this recently may be a build's on another machine."""


def check_build_locks(minutes: float, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
    """Raises StaleBuildLock naming a build lock whose build is dead; waits (saying so) while that cannot be
    told yet, at most until the lock is `minutes` old."""
    root = extensions_root()
    # with $TORCH_EXTENSIONS_DIR the build folders sit in it; by default under py311_cpu/ and the like
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        announced = False
        while (verdict := _judge(lock, minutes)) == "wait":
            if not announced:
                say(f"[hycam] waiting for {lock}: no process here holds it, but its folder is being written (a "
                    f"build on another machine?); it is judged once the writing stops or it is {minutes:g} minutes old")
                announced = True
            time.sleep(1)
        if verdict:
            raise StaleBuildLock(f"{lock}: {verdict}; a killed first-run build of a DeepSpeed op leaves it, and every "
                                 f"run would wait on it forever: delete it (rm {lock}) and start again")


def _judge(lock: Path, minutes: float) -> str | None:
    """Why `lock` is stale; None if it is gone or a live build's; "wait" while that is not known yet."""
    now = time.time()
    try:
        changed, holders = lock.stat().st_mtime, _holders(lock)
    except FileNotFoundError:  # its build just finished
        return None
    if holders:
        return None
    if _building(lock.parent, now - QUIET_SECONDS):  # a build on another machine sharing the folder?
        return "wait" if changed > now - minutes * 60 else None
    return (f"a torch-extensions build lock {_age(now - changed)} old that no process holds, and no build writing "
            f"in {lock.parent}")


def _holders(lock: Path) -> list[int]:
    """The processes of the lock's owner that have it open (torch's builder does while it builds). One
    that may not be read (not dumpable: no Python build) does not count."""
    target, owner, found = str(lock.resolve()), lock.stat().st_uid, []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid == owner and any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _age(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.0f} s"


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


def leave_group() -> None:
    """Ends this process's part in the process group (at interpreter exit, registered with atexit): left to
    the C++ teardown after Python's, its threads could abort the process ("terminate called without an
    active exception", exit code 134) after the run had said why it stopped."""
    if dist.is_initialized():
        dist.destroy_process_group()
