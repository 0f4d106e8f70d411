"""The signal watchdog (hycam.train.guards.Interrupts): a signal ends a rank stuck in a collective that
another rank never joins, within seconds and with one line (Python runs signal handlers only between
bytecodes, so without it the rank would wait for --dist_timeout); a worker whose launcher died stops as
on SIGTERM instead of training on alone."""

import signal
import subprocess
import sys
import time

from conftest import REPO, standalone_env
from test_guards import free_port


# guards.py alone: importing the hycam package (transformers, peft) would take most of each test's time
GUARDS = """
import importlib.util
spec = importlib.util.spec_from_file_location("guards", "hycam/train/guards.py")
guards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guards)
"""

STUCK = GUARDS + """
import sys, time
from datetime import timedelta
import torch, torch.distributed as dist

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=600))
with guards.Interrupts(stuck_seconds=2) as interrupts:
    interrupts.armed = True
    print("in", flush=True)
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(600)
"""

WORKER = GUARDS + """
import os, time
with guards.Interrupts(launcher=os.getppid()) as interrupts:
    interrupts.armed = True
    print("in", flush=True)
    while not interrupts.signum:
        time.sleep(0.05)
print(f"stopping on {interrupts.signum}", flush=True)
"""

LAUNCHER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); time.sleep(600)"


def hycam_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[hycam]" in line]


def test_a_signal_ends_a_rank_stuck_in_a_collective_with_one_line():
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", STUCK, str(rank), port], cwd=REPO, env=standalone_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        assert ranks[0].stdout.readline() == "in\n", ranks[0].stderr.read()
        time.sleep(1)  # into the all_reduce
        ranks[0].send_signal(signal.SIGTERM)
        code = ranks[0].wait(timeout=60)  # the collective's own timeout is 600 s
        err = ranks[0].stderr.read()
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert code == 128 + signal.SIGTERM
    assert hycam_lines(err) == [
        "[hycam] rank 0: stopped by SIGTERM while waiting 2 s in a collective for another rank (stopped, dead or not "
        "signalled); exiting without saving: the last complete resume state is kept"]


def test_a_worker_whose_launcher_is_killed_stops_as_on_sigterm():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER], cwd=REPO, env=standalone_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline() == "in\n"  # the worker's, through the inherited pipe
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on
        out, err = launcher.communicate(timeout=60)  # both ends close when the worker has exited
    finally:
        launcher.kill()
    assert out == f"stopping on {int(signal.SIGTERM)}\n"
    assert hycam_lines(err) == [f"[hycam] rank 0: the launcher (pid {launcher.pid}) is gone; stopping as on SIGTERM"]
