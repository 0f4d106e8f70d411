"""hycam-eval at the edges: wrong types in a checkpoint's JSON, an output folder it cannot write or that
another evaluation holds, records too long to score. Each ends in one line (exit 2) or a counted skip."""

import fcntl
import json
import os
import subprocess

import pytest
from test_eval_errors import checkpoint  # noqa: F401 (a fixture)

from hycam.evaluation import evaluate, scoring

ARGS = ["--no-progress", "--limit", "1", "--max-new-tokens", "2"]


def evaluate_into(checkpoint, out, capsys, *extra) -> tuple[int, list[str]]:
    """(exit code, the lines with "error:" on stderr) of hycam-eval writing to `out`."""
    code = evaluate.main(["--checkpoint", str(checkpoint), "--tasks", str(checkpoint.parent / "t.jsonl"),
                          "--output-dir", str(out), *ARGS, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("file, key, value", [("method.json", "options", {"rank": "4"}),
                                              ("hycam_config.json", "hycam_config", {"tau": "0.5"})])
def test_a_value_of_the_wrong_type_in_the_checkpoints_json_is_named(file, key, value, checkpoint, capsys):
    meta = json.loads((checkpoint / file).read_text())
    meta[key] = {**meta[key], **value}
    (checkpoint / file).write_text(json.dumps(meta))
    name, wrong = next(iter(value.items()))
    code, lines = evaluate_into(checkpoint, checkpoint.parent / "eval", capsys)
    assert code == 2
    assert lines == [f"hycam-eval: error: {checkpoint / file}: {key}.{name} is {wrong!r}, not of type "
                     f"{'int' if name == 'rank' else 'float'}"]
    assert not (checkpoint.parent / "eval").exists()


def test_an_output_dir_naming_a_file_is_refused_before_scoring(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "execute", lambda *a, **k: pytest.fail("scored before checking --output-dir"))
    out = checkpoint.parent / "results.txt"
    out.write_text("mine\n")
    code, lines = evaluate_into(checkpoint, out, capsys)
    assert code == 2
    assert lines == [f"hycam-eval: error: --output-dir {out} names a file, not a folder (File exists): choose "
                     "another directory"]
    assert out.read_text() == "mine\n"


def read_only_folder(path):
    """`path` made a folder this process cannot write: a read-only tmpfs for root, else its mode."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return None
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]).returncode:
        pytest.skip("root here cannot mount a read-only tmpfs")
    return path


def test_a_read_only_output_dir_is_refused_before_scoring(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "execute", lambda *a, **k: pytest.fail("scored before checking --output-dir"))
    out = checkpoint.parent / "read-only"
    mounted = read_only_folder(out)
    try:
        code, lines = evaluate_into(checkpoint, out, capsys)
        assert os.listdir(out) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(mounted)], check=True)
    assert code == 2
    reason = "Read-only file system" if mounted else "Permission denied"
    assert lines == [f"hycam-eval: error: --output-dir {out} cannot be written ({reason}): choose another directory"]


def test_an_output_dir_another_evaluation_holds_is_refused_and_left_alone(checkpoint, capsys):
    out = checkpoint.parent / "eval"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # as a running hycam-eval holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        code, lines = evaluate_into(checkpoint, out, capsys)
    assert code == 2
    assert lines == [f"hycam-eval: error: --output-dir {out} is in use by another run (pid 4242 on elsewhere): "
                     "wait for it to end, or choose another directory"]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert evaluate_into(checkpoint, out, capsys)[0] == 0  # released: the next one writes
    assert (out / "results.json").is_file()


def test_records_too_long_are_skipped_for_every_metric_and_counted(checkpoint, capsys, monkeypatch):
    records = [{"task": "t", "instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    records += [{"task": "t", "instruction": "read", "input": "x " * 150, "output": "no"},  # > context 256 - 8
                {"task": "t", "instruction": "read", "input": "y" * 5_000_000, "output": "no"}]  # never tokenised
    (checkpoint.parent / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenised = []
    for name in ("prompt_ids", "tokenize_record"):
        monkeypatch.setattr(scoring, name, lambda r, *a, _f=getattr(scoring, name), **k: tokenised.append(
            len(r.input)) or _f(r, *a, **k))
    out = checkpoint.parent / "eval"
    code = evaluate.main(["--checkpoint", str(checkpoint), "--tasks", str(checkpoint.parent / "t.jsonl"),
                          "--output-dir", str(out), "--no-progress", "--max-new-tokens", "8", "--max-length", "1000"])
    assert code == 0
    assert max(tokenised) == 300
    note = ("skipped 2 records too long for --max-length 1000 or the model's context of 256 tokens with "
            "--max-new-tokens 8, for every metric (t: 2)")
    assert f"hycam-eval: note: {note}" in capsys.readouterr().out.splitlines()
    result = json.loads((out / "results.json").read_text())
    assert (result["tasks"]["t"]["scored"], result["tasks"]["t"]["skipped"], result["skipped"]) == (5, 2, note)
    assert [r["nll"] is None for r in result["records"]] == [False, False, False, True, True]
    generated = [json.loads(line)["input"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert generated == ["", "", ""]
    assert f"Skipped: {note}" in (out / "results.md").read_text()


def test_a_failed_evaluation_leaves_no_output_folder_it_made(checkpoint, capsys):
    out = checkpoint.parent / "eval"
    code, lines = evaluate_into(checkpoint, out, capsys, "--base-model", str(checkpoint.parent / "no-such-model"))
    assert code == 2 and len(lines) == 1 and "no-such-model" in lines[0]
    assert not out.exists()
