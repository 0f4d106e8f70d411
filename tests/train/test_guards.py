"""What ends a run with a message instead of a hang: a stale build lock, a rank that stops answering."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, free_port, standalone_env

from hycam.train.guards import StaleBuildLock, check_build_locks

from test_train import FAST


def old_lock(root: Path, minutes: float) -> Path:
    """A build folder with a lock, both last touched `minutes` ago."""
    (root / "deepspeed_shm_comm").mkdir(parents=True)
    lock, source = root / "deepspeed_shm_comm" / "lock", root / "deepspeed_shm_comm" / "build.ninja"
    lock.touch()
    source.touch()
    for path in (lock, source):
        os.utime(path, (time.time() - 60 * minutes,) * 2)
    return lock


def test_a_stale_build_lock_stops_main_py_naming_it(tiny_model_dir, tmp_path):
    lock = old_lock(tmp_path / "extensions", 60)
    env = {**standalone_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--model", str(tiny_model_dir),
                           "--output_dir", str(tmp_path / "out"), "--stale_lock_minutes", "10"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"main.py: error: {lock}: a torch-extensions build lock 60 minutes old that no process holds, and no build "
        f"writing in {lock.parent}; "
        "a killed first-run build of a DeepSpeed op leaves it, and every run would wait on it forever: delete it "
        f"(rm {lock}) and start again"]
    assert not (tmp_path / "out").exists()


def test_a_lock_of_a_build_that_is_still_writing_is_left_alone(tmp_path, monkeypatch):
    lock = old_lock(tmp_path, 60)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(StaleBuildLock):
        check_build_locks(10)
    (lock.parent / "shm.o").touch()  # the compiler wrote a file just now
    check_build_locks(10)


def test_a_lock_let_go_while_it_is_judged_is_a_live_builds(tmp_path, monkeypatch):
    """A process loading an op it built takes the lock for a moment: gone by the end of the scan, it is no
    dead build's (two nodes starting at once tripped on this)."""
    from hycam.train import guards

    lock = old_lock(tmp_path, 60)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def released_during_the_scan(path):
        path.unlink()
        return []

    monkeypatch.setattr(guards, "_holders", released_during_the_scan)
    check_build_locks(10)
    assert not lock.exists()


def ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes torchrun started."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    found = {}
    for pid in map(int, children):
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        found[int(env["RANK"])] = pid
    return found


def test_a_rank_that_stops_answering_ends_the_run_within_the_timeout(tiny_model_dir, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "main.py"), "--model", str(tiny_model_dir), "--data", str(SHARED_DATA),
               "--output_dir", str(tmp_path / "run"), *FAST, "--max_steps", "100000", "--epochs", "100000",
               "--eval_interval", "100000", "--dist_timeout", "5"]
    log = open(tmp_path / "stderr", "w")
    launcher = subprocess.Popen(command, cwd=REPO, env=standalone_env(), stdout=subprocess.DEVNULL, stderr=log)
    pids = {}
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert launcher.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            time.sleep(0.1)
        pids = ranks(launcher)
        os.kill(pids[1], signal.SIGSTOP)  # rank 1 stops answering
        stopped = time.time()
        while Path(f"/proc/{pids[0]}").exists() and Path(f"/proc/{pids[0]}/stat").read_text().split()[2] != "Z":
            assert time.time() - stopped < 120, "rank 0 still waits"
            time.sleep(0.2)
    finally:
        for pid in pids.values():  # the stopped rank cannot act on torchrun's SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=120)
    messages = [line for line in (tmp_path / "stderr").read_text().splitlines() if "--dist_timeout" in line]
    assert messages and messages[0].startswith("[hycam] rank 0: another rank did not answer within --dist_timeout")
    assert "Timed out waiting 5000ms" in messages[0]
