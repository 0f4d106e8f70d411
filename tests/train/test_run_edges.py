"""main.py at the edges: a dead build's lock, a full disk, an output folder it cannot write, a resume state
of another run, the exit status of a refusal, non-finite options, missing data, a finished run. Each ends
in one line naming what is wrong (exit 2 for bad input), and what was on disk stays usable."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, SHARED_DATA, standalone_env
from safetensors import SafetensorError

from hycam.train import guards, resume
from hycam.train.guards import StaleBuildLock, check_build_locks
from test_runs import cli, train_steps
from test_train import FAST

SHORT = ["--max_steps", "6", "--eval_interval", "2", "--lr", "1e-2", "--epochs", "100"]


def argv(model_dir, out, *extra):
    return ["--model", str(model_dir), "--data", str(SHARED_DATA), "--output_dir", str(out), *FAST, *SHORT, *extra]


@pytest.fixture(scope="module", autouse=True)
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")


def files(out) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# 1. a build lock whose owner is dead


def test_a_fresh_build_lock_no_process_holds_stops_main_py_naming_it(tiny_model_dir, tmp_path):
    build = tmp_path / "extensions" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    for name in ("lock", "shm.o"):  # a build killed 5 minutes ago (under --stale_lock_minutes), mid-compile
        (build / name).touch()
        os.utime(build / name, (time.time() - 300,) * 2)
    env = {**standalone_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--model", str(tiny_model_dir),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 2
    lock = build / "lock"
    assert done.stderr.strip().splitlines()[-1] == (
        f"main.py: error: {lock}: a torch-extensions build lock 5 minutes old that no process holds, and no build "
        f"writing in {build}; a killed first-run build of a DeepSpeed op leaves it, and every run would wait on it "
        f"forever: delete it (rm {lock}) and start again")
    assert not (tmp_path / "out").exists() and lock.exists()


def test_a_held_lock_is_a_live_build_and_an_unheld_one_still_written_is_waited_on_saying_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(guards, "QUIET_SECONDS", 1)
    (tmp_path / "op").mkdir()
    lock = tmp_path / "op" / "lock"
    said = []
    with open(lock, "w"):  # held, as torch's builder holds it while it builds
        (tmp_path / "op" / "shm.o").touch()
        check_build_locks(10, said.append)
    assert said == []
    with pytest.raises(StaleBuildLock, match="that no process holds"):
        check_build_locks(10, said.append)  # unheld, written just now: waits for the writing to stop
    assert said == [f"[hycam] waiting for {lock}: no process here holds it, but its folder is being written (a build "
                    "on another machine?); it is judged once the writing stops or it is 10 minutes old"]


# 3. a full disk


def no_space(calls: list, fail_at: int):
    """safetensors' save_file that fails as a full disk does at its `fail_at`-th call (1-based)."""
    save = resume.save_file

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == fail_at:
            open(path, "wb").write(b"\0" * 100)  # what it had written
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(tensors, path, metadata=metadata)
    return save_file


def test_a_disk_full_while_saving_keeps_the_last_good_state_and_resume_continues_from_it(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    out, calls = tmp_path / "run", []
    with monkeypatch.context() as patch:
        patch.setattr(resume, "save_file", no_space(calls, 3))  # the second resume state: step 4
        code, stderr = cli(argv(tiny_model_dir, out))
    assert code == 2
    best_step = json.loads((out / "best" / "method.json").read_text())["step"]
    assert stderr.strip().splitlines()[-1] == (
        f"main.py: error: {out}: no space left on the device writing resume/ at step 4; resume/ is left as it was. "
        f"The last good checkpoints are kept in {out}/best (step {best_step}) and {out}/resume (step 2). Free space, "
        f"then continue with --resume true (from {out}/resume, step 2)")
    assert files(out) == [".lock", "best", "metrics.jsonl", "resume", "run_config.json", "tensorboard"]
    assert json.loads((out / "resume" / "state.json").read_text())["progress"]["step"] == 2
    code, stderr = cli(argv(tiny_model_dir, out, "--resume", "true"))
    assert code == 0, stderr
    assert train_steps(out) == [1, 2, 3, 4, 5, 6] and (out / "summary.json").is_file()


def test_a_disk_full_at_the_first_save_says_resume_starts_over_and_it_does(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    out, calls = tmp_path / "run", []
    with monkeypatch.context() as patch:
        patch.setattr(resume, "save_file", no_space(calls, 1))
        code, stderr = cli(argv(tiny_model_dir, out, "--max_steps", "2"))
    assert code == 2
    assert stderr.strip().splitlines()[-1].endswith(
        f"The last good checkpoints are kept in {out}/best (step 2). Free space, then run again with --resume true: "
        "with no resume/ saved it starts again from step 0 (best/ holds weights only, no optimizer state)")
    assert "resume" not in files(out) and not any(name.startswith(".resume") for name in files(out))
    capsys.readouterr()
    code, stderr = cli(argv(tiny_model_dir, out, "--max_steps", "2", "--resume", "true"))
    assert code == 0, stderr
    assert (f"[hycam] --resume: {out} has no resume state (best/ holds trained weights only, no optimizer state): "
            "starting the run again from step 0") in capsys.readouterr().out.splitlines()
    assert train_steps(out) == [1, 2]


def small_folder(path, size: str):
    """A tmpfs of `size` at `path` where this machine lets the tests mount one, else None."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        return None
    return path


def test_a_folder_too_small_for_the_checkpoints_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "small"
    mounted = small_folder(out, "150k")
    if not mounted:  # the same free space, told by the call that reads it
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(150 << 10, 0, 150 << 10))
    try:
        code, stderr = cli(argv(tiny_model_dir, out))
        left = files(out)
    finally:
        if mounted:
            subprocess.run(["umount", str(mounted)], check=True)
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"main.py: error: --output_dir {out}: 0.15 MB free, but the run's checkpoints need about ")
    assert line.endswith(" MB (resume/, best/ and last/, each twice while it is replaced): free space or choose "
                         "another directory")
    assert left == [".lock"]


# 4. an output folder that cannot be written


def test_an_output_dir_naming_a_file_is_refused_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    code, stderr = cli(argv(tiny_model_dir, out))
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (f"main.py: error: --output_dir {out} names a file, not a folder "
                                               "(File exists): choose another directory")
    assert out.read_text() == "mine\n"


def test_a_read_only_output_dir_is_refused_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)]).returncode:
        pytest.skip("root here cannot mount a read-only tmpfs")
    try:
        code, stderr = cli(argv(tiny_model_dir, out))
        left = files(out)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(out)], check=True)
    assert code == 2
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert stderr.strip().splitlines()[-1] == (f"main.py: error: --output_dir {out} cannot be written ({reason}): "
                                               "choose another directory")
    assert left == []


# 5. a resume state of another run


@pytest.fixture(scope="module")
def halted(tiny_model_dir, tmp_path_factory):
    """Runs halted after step 2 (resume/ of step 2): this run's, and two others' of the same shapes."""
    root = tmp_path_factory.mktemp("halted")
    for name, extra in (("ours", []), ("seed", ["--seed", "99", "--lr", "0.05"]), ("lora", ["--method", "lora"])):
        assert cli(argv(tiny_model_dir, root / name, "--halt_after_steps", "2", *extra))[0] == 0
    return root


@pytest.mark.parametrize("other, differ", [
    ("seed", "--seed 99 (this run: 2333), --lr 0.05 (this run: 0.01)"),
    ("lora", "--method 'lora' (this run: 'hycam')")])
def test_a_resume_state_of_another_run_is_refused_naming_what_differs(other, differ, halted, tiny_model_dir,
                                                                      tmp_path):
    out = tmp_path / "run"
    shutil.copytree(halted / "ours", out)
    shutil.rmtree(out / "resume")
    shutil.copytree(halted / other / "resume", out / "resume")
    before = (out / "metrics.jsonl").read_text()
    code, stderr = cli(argv(tiny_model_dir, out, "--resume", "true"))
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"main.py: error: {out}/resume/state.json: saved by another run: {differ}; resume the run that saved it with "
        "its own options, or start this one in a new --output_dir")
    assert (out / "metrics.jsonl").read_text() == before and not (out / "last").exists()


# 8. the exit status of a refusal


def test_a_refused_resume_exits_2_with_its_one_line(halted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(halted / "ours", out)
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *argv(tiny_model_dir, out, "--resume", "true",
                                                                        "--seed", "7")],
                          capture_output=True, text=True, cwd=REPO, env=standalone_env(), timeout=300)
    assert done.returncode == 2  # not 134: the process group is left before the C++ teardown (atexit)
    assert done.stderr.strip().splitlines()[-1].startswith(
        "main.py: error: --resume: --seed is 7, but the run was started with 2333")
    assert "terminate called" not in done.stderr
    assert files(out) == files(halted / "ours")


# 9. non-finite numbers


@pytest.mark.fast
@pytest.mark.parametrize("where, value, line", [
    ("yaml", "1e400", "main.py: error: {config}: lr: expected a finite number, got '1e400' (see --help)"),
    ("cli", "inf", "main.py: error: argument --lr: expected a finite number, got 'inf' (see --help)"),
    ("cli", "nan", "main.py: error: argument --lr: expected a finite number, got 'nan' (see --help)")])
def test_a_non_finite_number_is_refused_where_it_is_read(where, value, line, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: {value}\n")
    extra = ["--config", str(config)] if where == "yaml" else ["--lr", value]
    code, stderr = cli(["--output_dir", str(tmp_path / "out"), *extra])
    assert code == 2
    assert stderr.strip().splitlines() == [line.format(config=config)]
    assert not (tmp_path / "out").exists()


# 10. missing data, a finished run


def test_every_missing_data_path_is_named(tiny_model_dir, tmp_path):
    typos = [str(tmp_path / "train.jsonl"), str(tmp_path / "more" / "test.jsonl")]
    code, stderr = cli(["--model", str(tiny_model_dir), "--data", typos[0], str(SHARED_DATA), typos[1],
                        "--output_dir", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (f"main.py: error: {typos[0]}, {typos[1]}: no such file or folder (the "
                                               "generated tasks are 'synthetic', a Hub dataset is 'hub:NAME')")
    assert files(tmp_path / "out") == [".lock"]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A run that reached its last step, in a folder whose name holds a space."""
    out, log = tmp_path_factory.mktemp("finished") / "my run", io.StringIO()
    with contextlib.redirect_stdout(log):  # where the run's messages go
        code, stderr = cli(argv(tiny_model_dir, out, "--max_steps", "2"))
    assert code == 0, stderr
    return out, log.getvalue()


def test_the_evaluate_line_of_a_finished_run_is_quoted_for_a_shell(finished):
    out, log = finished
    assert log.strip().splitlines()[-1] == f"[hycam] evaluate it: hycam-eval --checkpoint '{out}/best'"


def test_a_plain_rerun_of_a_finished_run_says_to_evaluate_it_not_to_resume(finished, tiny_model_dir):
    out, _ = finished
    before = {name: (out / name).stat().st_mtime_ns for name in files(out)}
    code, stderr = cli(argv(tiny_model_dir, out, "--max_steps", "2"))
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"main.py: error: --output_dir {out} holds a finished run ({out}/summary.json): evaluate it with hycam-eval "
        f"--checkpoint '{out}/best', or choose another directory to train again")
    assert {name: (out / name).stat().st_mtime_ns for name in files(out) if name != ".lock"} == {
        name: t for name, t in before.items() if name != ".lock"}
