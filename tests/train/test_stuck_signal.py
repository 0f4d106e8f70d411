"""A signal ends a rank stuck in a collective that another rank never joins, within seconds and with one
line: Python runs signal handlers only between bytecodes, so without the watchdog the rank would wait
for --dist_timeout."""

import signal
import subprocess
import sys
import time

from conftest import REPO
from test_guards import free_port
from test_runs import own_process_env

STUCK = """
import importlib.util, sys, time
from datetime import timedelta
import torch, torch.distributed as dist

# guards.py alone: importing the hycam package (transformers, peft) would take most of the test's time
spec = importlib.util.spec_from_file_location("guards", "hycam/train/guards.py")
guards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guards)

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=600))
with guards.Interrupts() as interrupts:
    interrupts.armed = True
    print("in", flush=True)
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(600)
"""


def test_a_signal_ends_a_rank_stuck_in_a_collective_with_one_line(tmp_path):
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", STUCK, str(rank), port], cwd=REPO, env=own_process_env(),
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
    assert [line for line in err.splitlines() if "[hycam]" in line] == [
        "[hycam] rank 0: stopped by SIGTERM while waiting 5 s in a collective for another rank (stopped, dead or not "
        "signalled); exiting without saving: the last complete resume state is kept"]
