"""One writer per output folder: main.py's run directory and hycam-eval's --output-dir are locked alike,
with an ``flock`` on their ``.lock`` file, so a process that dies holds none."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from hycam.files import LOCK


class FolderError(FileExistsError):
    """An output folder that cannot be used: it names a file, cannot be written, or another run holds it."""


def lock(out: Path, option: str = "--output_dir") -> IO[str]:
    """Creates `out` if needed and takes its lock (an open file: closing it releases the lock); a folder
    that cannot be written, or in use, is a FolderError naming `option`, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        file = (out / LOCK).open("a+")
    except OSError as err:
        what = "names a file, not a folder" if out.exists() and not out.is_dir() else "cannot be written"
        raise FolderError(f"{option} {out} {what} ({err.strerror}): choose another directory") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise FolderError(f"{option} {out} is in use by another run ({holder}): wait for it to end, "
                          "or choose another directory") from None
    file.truncate(0)
    file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    return file
