"""What ends a run cleanly instead of killing or hanging it: signals and stale build locks.

- ``leave_group``: the process group is left at exit before the C++ teardown could abort it.
- ``Interrupts``: the first SIGINT/SIGTERM asks the loop to save its resume state at the next
  optimizer step and stop; a second one (or one before training started) stops at once. Python runs
  a signal handler only between bytecodes, so a rank blocked in a collective that another rank never
  joins would not see it before --dist_timeout: a watchdog thread, woken by the signal itself, ends
  such a rank after `STUCK_SECONDS` in the same collective call. Under a launcher (torchrun, deepspeed)
  the same thread treats the launcher's death (kill -9, the OOM killer) as SIGTERM: a worker left
  behind would otherwise go on training alone.
- ``check_build_locks``: torch's C++-extension builder (which DeepSpeed uses for its ops) waits
  forever on a ``lock`` file a killed build left behind. The builder keeps the lock open while it
  builds (torch's ``FileBaton``), so a lock that no process holds is a dead build's, whatever its
  age: the run stops naming the file. Only while files of its folder are still being written (a
  build on another machine sharing the folder) is it waited on, saying so, until the writing stops
  or the lock is ``--stale_lock_minutes`` old.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STUCK_SECONDS = 10.0
"""How long a signalled rank may sit in one collective call before the watchdog ends it. From inside, a peer
that is gone looks like one that is busy: a rank waiting this long at a barrier while rank 0 writes a big
checkpoint exits too (rank 0 then stops at its next collective; the last complete checkpoint is kept)."""
_COLLECTIVE_CODE = ("torch/distributed/", "deepspeed/comm/", "deepspeed/runtime/zero/")
"""Where a stack that waits for other ranks passes: torch's collectives, DeepSpeed's, ZeRO-3's gathers."""


class Interrupted(Exception):
    """A run stopped by a signal; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StaleBuildLock(RuntimeError):
    """A torch-extensions build lock that no running build holds."""


class Interrupts:
    """Signal handlers for the block: `signum` is the first signal received once `armed`; a rank that
    a signal finds stuck in a collective exits (128 + signum) with one line."""

    def __init__(self, stuck_seconds: float = STUCK_SECONDS, launcher: int | None = None) -> None:
        """`launcher`: the pid of the process that started this one and must outlive it (None: none)."""
        self.armed, self.signum, self._previous = False, 0, {}
        self.stuck_seconds, self.launcher = stuck_seconds, launcher
        self._wakeup: tuple[int, int] | None = None

    def __enter__(self) -> "Interrupts":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read, write = os.pipe()
        os.set_blocking(write, False)  # the C-level handler must never block
        self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        watchdog = threading.Thread(target=self._watch, args=(read, threading.main_thread()), daemon=True,
                                    name="hycam-signal-watchdog")
        watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        write, previous = self._wakeup
        signal.set_wakeup_fd(previous)
        os.close(write)  # the watchdog reads end-of-file and returns
        self._wakeup = None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum, f"stopped by {name} before training started: nothing to save")
        if self.signum:
            raise Interrupted(signum, f"stopped by a second signal ({name}) without saving: the last "
                                      "complete resume state is kept")
        self.signum = signum

    def _watch(self, read: int, main: threading.Thread) -> None:
        """Waits for a signal (the wakeup fd's byte), then for the main thread to leave a collective call;
        meanwhile, once a second, for the launcher's death."""
        with os.fdopen(read, "rb", buffering=0) as wakeup:
            while True:
                if not select.select([wakeup], [], [], 1.0)[0]:
                    self._signal_if_orphaned()
                    continue
                byte = wakeup.read(1)
                if not byte:  # the block was left
                    return
                if byte[0] in SIGNALS:
                    self._end_if_stuck(signal.Signals(byte[0]), main)
                    return

    def _signal_if_orphaned(self) -> None:
        if self.launcher is not None and os.getppid() != self.launcher:
            say(f"[hycam] rank {os.environ.get('RANK', 0)}: the launcher (pid {self.launcher}) is gone; "
                "stopping as on SIGTERM")
            self.launcher = None
            os.kill(os.getpid(), signal.SIGTERM)

    def _end_if_stuck(self, signum: signal.Signals, main: threading.Thread) -> None:
        """Exits once the main thread has sat `stuck_seconds` in one call of a collective; returns when the
        block is left."""
        since, last = time.monotonic(), None
        while self._wakeup is not None and main.is_alive():
            frame = sys._current_frames().get(main.ident)
            place = (frame, frame.f_lasti) if frame is not None else None
            if place != last:
                since, last = time.monotonic(), place
            elif time.monotonic() - since >= self.stuck_seconds and _in_collective(frame):
                say(f"[hycam] rank {os.environ.get('RANK', 0)}: stopped by {signum.name} while waiting "
                    f"{self.stuck_seconds:.0f} s in a collective for another rank (stopped, dead or not signalled); "
                    "exiting without saving: the last complete resume state is kept")
                os._exit(128 + signum)
            time.sleep(0.2)


def _in_collective(frame) -> bool:
    """The stack of `frame` passes through code that waits for other ranks."""
    while frame is not None:
        if any(part in frame.f_code.co_filename.replace(os.sep, "/") for part in _COLLECTIVE_CODE):
            return True
        frame = frame.f_back
    return False


def say(message: str) -> None:
    """Prints once per machine (local rank 0), to stderr."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


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
        before, holders, after = lock.stat(), _holders(lock), lock.stat()
    except FileNotFoundError:  # its build just finished
        return None
    # A process loading an op it built before takes the lock for a moment: one that let go of it while the scan
    # ran (and another that took it again) is not a dead build.
    if holders or (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns):
        return None
    changed = after.st_mtime
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
