"""Runs that survive what happens to real ones: a second run on the same directory, SIGTERM, kill -9
before the first evaluation, a NaN at step 2, a changed option on resume, a crash inside a
checkpoint swap. Every resumed run must end on the weights of the run that was never stopped."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SHARED_DATA, standalone_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hycam.baselines import methods
from hycam.train import loop
from test_train import FAST, strict_json

SCHEDULE = ["--max_steps", "30", "--eval_interval", "15", "--lr", "1e-2", "--epochs", "100"]


def argv(model_dir, out, *extra):
    return ["--model", str(model_dir), "--data", str(SHARED_DATA), "--output_dir", str(out), *FAST, *SCHEDULE, *extra]


def cli(args) -> tuple[int, str]:
    """(exit code, stderr) of main.py's command line, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            loop.cli(args)
        except SystemExit as stop:
            return stop.code, err.getvalue()
    return 0, err.getvalue()


def start(model_dir, out, *extra) -> subprocess.Popen:
    log = open(f"{out}.stderr", "w")
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *argv(model_dir, out, *extra)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log, env=standalone_env())


def train_steps(out) -> list[int]:
    lines = [line for line in (out / "metrics.jsonl").read_text().split("\n")[:-1]]  # complete lines only
    return [json.loads(line)["step"] for line in lines if '"train"' in line]


def stop_after_step(process: subprocess.Popen, out, step: int) -> None:
    """Freezes `process` (SIGSTOP) once it has logged `step`."""
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and train_steps(out) and train_steps(out)[-1] >= step):
        assert process.poll() is None and time.time() < deadline, open(f"{out}.stderr").read()[-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGSTOP)


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "last" / "hycam_model.safetensors")


def assert_same_weights(out, reference) -> None:
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The run that was never stopped."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    out = tmp_path_factory.mktemp("straight") / "run"
    loop.main(argv(tiny_model_dir, out))
    return out


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, straight, tmp_path_factory):
    """Run A frozen after step 2 while run B tries the same directory; then SIGTERM for A."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    first = start(tiny_model_dir, out)
    stop_after_step(first, out, 2)
    second = cli(argv(tiny_model_dir, out))
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    first.wait(timeout=300)
    return {"out": out, "first": first, "first_stderr": open(f"{out}.stderr").read(), "second": second}


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_first(interrupted):
    code, stderr = interrupted["second"]
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"main.py: error: --output_dir {interrupted['out']} is in use by another run (pid "
        f"{interrupted['first'].pid} on {os.uname().nodename}): wait for it to end, or choose another directory"]


def test_sigterm_saves_the_resume_state_of_the_step_and_exits_with_one_line(interrupted):
    out = interrupted["out"]
    step = json.loads((out / "resume" / "state.json").read_text())["progress"]["step"]
    assert 2 <= step < 15  # saved at the interrupt, not at an evaluation
    assert interrupted["first"].returncode == 128 + signal.SIGTERM
    assert interrupted["first_stderr"].strip().splitlines()[-1] == (
        f"[hycam] stopped by SIGTERM after step {step}: its resume state is in {out}/resume; "
        "continue with --resume true")
    assert "Traceback" not in interrupted["first_stderr"]


def test_the_resume_state_holds_the_trained_tensors_and_json_only(interrupted, tiny_model_dir):
    resume = interrupted["out"] / "resume"
    assert sorted(p.name for p in resume.iterdir()) == ["optimizer-rank0.safetensors", "state.json",
                                                         "trained.safetensors"]
    model = methods.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "hycam",
                            methods.MethodOptions(rank=8, num_specialized=3))
    assert set(load_file(resume / "trained.safetensors")) == set(methods.trainable(model, "hycam"))
    moments = {key.split(".", 2)[2] for key in load_file(resume / "optimizer-rank0.safetensors") if "state." in key}
    assert moments == {"step", "exp_avg", "exp_avg_sq"}


def test_a_run_stopped_by_sigterm_resumes_to_the_weights_of_the_straight_run(interrupted, straight, tiny_model_dir):
    out = interrupted["out"]
    assert cli(argv(tiny_model_dir, out, "--resume", "true"))[0] == 0
    assert_same_weights(out, straight)
    assert train_steps(out) == list(range(1, 31))


def test_a_run_killed_before_its_first_evaluation_resumes_from_step_0(straight, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    victim = start(tiny_model_dir, out)
    stop_after_step(victim, out, 2)
    assert not (out / "resume").exists()
    victim.kill()
    victim.wait(timeout=60)
    code, stderr = cli(argv(tiny_model_dir, out, "--resume", "true"))
    assert code == 0, stderr
    assert_same_weights(out, straight)
    assert train_steps(out) == list(range(1, 31))


def test_a_nan_before_the_first_evaluation_says_so_and_a_rerun_replaces_the_run(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    prepare, calls = methods.prepare, []

    def poisoned(model, method, options):  # training forwards after the first return NaN logits
        model = prepare(model, method, options)
        model.lm_head.register_forward_hook(
            lambda m, i, out: out * float("nan") if m.training and calls.append(1) is None and len(calls) > 1 else out)
        return model

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(methods, "prepare", poisoned)
        with pytest.raises(SystemExit, match="the loss is nan at step 2") as stop:
            loop.main(argv(tiny_model_dir, out))
    assert str(stop.value).endswith(f"No evaluation finished before, so no checkpoint was kept; a new run may "
                                    f"reuse {out}.")
    assert [strict_json(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    loop.main(argv(tiny_model_dir, out, "--max_steps", "2", "--eval_interval", "2"))
    assert train_steps(out) == [1, 2] and (out / "last").is_dir()


@pytest.fixture(scope="module")
def halted(tiny_model_dir, straight, tmp_path_factory):
    """A run halted after step 20: best/ and resume/ of its evaluation at step 15."""
    out = tmp_path_factory.mktemp("halted") / "run"
    loop.main(argv(tiny_model_dir, out, "--halt_after_steps", "20"))
    return out


@pytest.mark.parametrize("option, value, recorded", [("--seed", "7", "2333"), ("--max_records_per_task", "4", "3"),
                                                     ("--lr", "0.005", "0.01")])
def test_a_resume_with_a_changed_option_is_refused_naming_it(option, value, recorded, halted, tiny_model_dir):
    before = (halted / "metrics.jsonl").read_text()
    code, stderr = cli(argv(tiny_model_dir, halted, "--resume", "true", option, value))
    assert code == 2
    assert stderr.strip() == (f"main.py: error: --resume: {option} is {value}, but the run was started with "
                              f"{recorded} ({halted}/run_config.json): resume with the recorded value, or start a "
                              "new --output_dir")
    assert (halted / "metrics.jsonl").read_text() == before


def test_swaps_a_crash_interrupted_are_recovered_at_the_next_start(halted, straight, tiny_model_dir):
    (halted / "resume").rename(halted / ".resume.old")  # crashed between the two renames of the swap
    (halted / ".resume.tmp").mkdir()  # ... with the next state half-written
    (halted / ".resume.tmp" / "trained.safetensors").write_bytes(b"half")
    (halted / "best").rename(halted / ".best.new")  # crashed after the new best/ was complete
    (halted / "..best.tmp.x1y2").mkdir()  # a temporary of an interrupted checkpoint write
    code, stderr = cli(argv(tiny_model_dir, halted, "--resume", "true"))
    assert code == 0, stderr
    assert_same_weights(halted, straight)
    assert sorted(p.name for p in halted.glob(".*")) == [".lock"]
    assert json.loads((halted / "best" / "method.json").read_text())["step"] in (15, 30)
