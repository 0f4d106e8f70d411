"""run_model_base.sh maps the authors' positional arguments onto main.py's options."""

import subprocess

from conftest import REPO
from test_guards import free_port


def launch(*args):
    return subprocess.run(["bash", str(REPO / "run_model_base.sh"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


def test_positional_arguments_become_named_options():
    done = launch("1200", "Qwen2.5-0.5B", "2", "2", "4", "8", "3", "2e-5", "5", "64", "2e-5", "0.05", "0.03",
                  "--dry_run", "--launcher", "torchrun", "--gpus", "2", "--", "--method", "lora")
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    expected = {"--max_length": "1200", "--model": "models/Qwen2.5-0.5B", "--zero_stage": "2",
                "--micro_batch_size": "2", "--grad_accum": "4", "--eval_batch_size": "8", "--epochs": "3",
                "--lr": "2e-5", "--num_specialized": "5", "--rank": "64", "--weight_decay": "0.05",
                "--warmup_ratio": "0.03", "--method": "lora", "--nproc_per_node": "2"}
    assert {k: words[words.index(k) + 1] for k in expected} == expected


def test_a_dash_keeps_the_default_and_hostfile_goes_to_deepspeed():
    done = launch("-", "-", "3", "--dry_run", "--launcher", "deepspeed", "--hostfile", "hosts", "--num_nodes", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deepspeed") and "--hostfile hosts --num_nodes 2" in done.stdout
    assert "--zero_stage 3" in done.stdout and "--max_length" not in done.stdout


def test_bad_arguments_are_named():
    assert "unknown option --nope" in launch("--nope").stderr
    assert "at most 13" in launch(*["1"] * 14).stderr
    assert "--launcher must be" in launch("--dry_run", "--launcher", "mpi").stderr


def test_a_refused_directory_keeps_its_launch_log(tmp_path):
    run = tmp_path / "run"
    (run / "resume").mkdir(parents=True)  # the directory of another run, which main.py refuses
    (run / "launch.log").write_text("the earlier run's log\n")
    done = launch("--launcher", "torchrun", "--gpus", "1", "--master_port", str(free_port()),
                  "--output_dir", str(run))
    assert done.returncode != 0
    log = (run / "launch.log").read_text()
    assert log.startswith("the earlier run's log\n")
    assert f"--output_dir {run} already holds a run with checkpoints" in log
