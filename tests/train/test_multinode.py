"""Two nodes of one job on localhost, each started by its own run_model_base.sh (torchrun, one process
each): they train together; a signal to one node's launcher stops both with their resume state and
leaves no worker behind; a node that is lost ends the other with one line long before --dist_timeout."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, standalone_env

from test_guards import free_port
from test_runs import train_steps
from test_train import FAST

ENDLESS = ["--max_steps", "100000", "--epochs", "100000", "--eval_interval", "100000", "--dist_timeout", "600",
           "--bf16", "false"]


def start_nodes(model_dir, out: Path) -> list[subprocess.Popen]:
    """Node 0 and node 1, each the way a user starts it on its machine; output in out/node<k>.log."""
    port, nodes = str(free_port()), []
    for rank in (0, 1):
        command = ["bash", str(REPO / "run_model_base.sh"), "--launcher", "torchrun", "--gpus", "1",
                   "--num_nodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                   "--config", "configs/cpu_smollm2.yaml", "--output_dir", str(out / "run"), "--",
                   "--model", str(model_dir), "--data", str(SHARED_DATA), *FAST, *ENDLESS]
        nodes.append(subprocess.Popen(command, cwd=REPO, env=standalone_env(), stdout=open(out / f"node{rank}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + 300
    while not ((out / "run" / "metrics.jsonl").is_file() and len(train_steps(out / "run")) >= 2):
        assert time.time() < deadline and all(n.poll() is None for n in nodes), (out / "node0.log").read_text()[-3000:]
        time.sleep(0.2)
    return nodes


def worker(launcher: subprocess.Popen) -> int:
    """The pid of the main.py process the node's launcher started."""
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if "main.py" in Path(f"/proc/{pid}/cmdline").read_text():
            return int(pid)
    raise AssertionError("no worker")


def hycam_lines(out: Path, rank: int) -> list[str]:
    return [line for line in (out / f"node{rank}.log").read_text().splitlines() if line.startswith("[hycam]")]


def finish(nodes: list[subprocess.Popen]) -> list[int]:
    """Exit codes; whatever is still running after two minutes is killed (and the test fails)."""
    try:
        return [node.wait(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)


@pytest.fixture
def data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")


def test_sigterm_to_one_nodes_launcher_stops_both_nodes_with_the_resume_state(data, tiny_model_dir, tmp_path):
    nodes = start_nodes(tiny_model_dir, tmp_path)
    node1_worker = worker(nodes[1])
    nodes[1].send_signal(signal.SIGTERM)  # the script's own pid: it became the node's launcher
    codes = finish(nodes)
    assert not Path(f"/proc/{node1_worker}").exists()  # not left training
    step = train_steps(tmp_path / "run")[-1]
    stopped = (f"[hycam] stopped by SIGTERM after step {step}: its resume state is in {tmp_path / 'run'}/resume; "
               "continue with --resume true")
    assert hycam_lines(tmp_path, 0)[-1] == hycam_lines(tmp_path, 1)[-1] == stopped
    assert codes[1] != 0 and (tmp_path / "run" / "resume").is_dir()


def test_a_lost_node_ends_the_other_with_one_line_long_before_the_timeout(data, tiny_model_dir, tmp_path):
    nodes = start_nodes(tiny_model_dir, tmp_path)
    for pid in (worker(nodes[1]), nodes[1].pid):  # the machine of node 1 goes away
        os.kill(pid, signal.SIGKILL)
    codes = finish(nodes)  # --dist_timeout is 600 s
    last = hycam_lines(tmp_path, 0)[-1]
    assert last.startswith("[hycam] rank 0: lost the connection to another rank (its process or node stopped); "
                           "stopping. (") and "Connection" in last
    assert codes[0] != 0 and "[rank0]: Traceback" not in (tmp_path / "node0.log").read_text()
