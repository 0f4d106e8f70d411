"""What the units run in: a subprocess with this checkout's hycam, and the one commit the study runs from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hycam.checkpoint import read_json
from hycam.study.layout import PROVENANCE, REPO, atomic_write


def subprocess_runner(argv: list[str], log: Path, threads: int = 2) -> int:
    # PYTHONPATH: every unit runs this checkout's hycam, whether or not (or wherever) it is installed.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    with log.open("w") as out:
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def git_state(repo: Path = REPO) -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it) of the checkout the study runs from."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                             capture_output=True, text=True).stdout.strip()
    return head or "unknown", bool(changes)


def check_commit(root: Path, allow_dirty: bool, quick: bool, repo: Path = REPO) -> None:
    """Records the commit in STUDY/provenance.json; a dirty tree, or another commit than the one the study
    started from, stops a study (a smoke run only warns), unless `allow_dirty`, which the record keeps."""
    head, dirty = git_state(repo)
    file = root / PROVENANCE
    record = read_json(file) if file.is_file() else {"commit": head, "dirty": False}
    problem = ("the checkout has uncommitted changes" if dirty else f"the study started at commit "
               f"{record['commit']}, the checkout is at {head}" if record["commit"] != head else None)
    if problem and not (allow_dirty or quick):
        raise SystemExit(f"reproduce: {problem}; run the study from a worktree of one commit "
                         "(git worktree add ../study HEAD), or pass --allow_dirty")
    if problem:
        print(f"[reproduce] warning: {problem}", file=sys.stderr)
    if not file.is_file() or (problem and not record["dirty"]):
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps({**record, "dirty": bool(problem)}, indent=2) + "\n")
