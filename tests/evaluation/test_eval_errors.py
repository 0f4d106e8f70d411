"""hycam-eval on a damaged checkpoint: exit code 2 and one line naming the file at fault."""

import json

import pytest

import hycam
from hycam.baselines import methods
from hycam.baselines.methods import MethodOptions, save_trained
from hycam.evaluation import evaluate

OPTIONS = MethodOptions(rank=8, num_specialized=3)


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    """A HyCAM checkpoint of the tiny Llama as main.py writes it, and one task file."""
    from transformers import AutoModelForCausalLM

    model = hycam.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        hycam.HyCAMConfig(num_specialized=3, rank=8))
    save_trained(model, "hycam", OPTIONS, tmp_path / "best",
                 {"model": str(tiny_model_dir), "gguf_file": None, "seed": 1, "template": "plain"})
    records = [{"task": "t", "instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "best"


def error_line(checkpoint, capsys) -> str:
    argv = ["--checkpoint", str(checkpoint), "--tasks", str(checkpoint.parent / "t.jsonl"), "--no-progress",
            "--limit", "1", "--max-new-tokens", "2"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # not transformers' loading bar
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_the_untouched_checkpoint_evaluates(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--tasks", str(checkpoint.parent / "t.jsonl"), "--no-progress",
            "--limit", "1", "--max-new-tokens", "2"]
    assert evaluate.main(argv) == 0
    assert json.loads((checkpoint / "eval-all" / "results.json").read_text())["method"] == "hycam"  # --tasks: all


def test_the_checkpoints_method_json_is_read_once(checkpoint, monkeypatch):
    read = []
    monkeypatch.setattr(methods, "read_method", lambda path, _read=methods.read_method: read.append(path) or _read(path))
    argv = ["--checkpoint", str(checkpoint), "--tasks", str(checkpoint.parent / "t.jsonl"), "--no-progress",
            "--limit", "1", "--max-new-tokens", "2"]
    assert evaluate.main(argv) == 0
    assert len(read) == 1


def test_a_truncated_weights_file_is_named(checkpoint, capsys):
    weights = checkpoint / "hycam_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = error_line(checkpoint, capsys)
    assert line.startswith("hycam-eval: error: ") and f"{weights}: not a readable safetensors file" in line


def test_an_invalid_method_json_is_named(checkpoint, capsys):
    (checkpoint / "method.json").write_text('{"method": "hycam",')
    assert f"{checkpoint / 'method.json'}: not valid JSON" in error_line(checkpoint, capsys)


def test_a_method_json_that_disagrees_with_the_weights_is_refused(checkpoint, capsys):
    meta = json.loads((checkpoint / "method.json").read_text())
    (checkpoint / "method.json").write_text(json.dumps({**meta, "method": "shared_only"}))
    line = error_line(checkpoint, capsys)
    assert (f"{checkpoint / 'method.json'} names 'shared_only', but {checkpoint / 'hycam_config.json'} holds "
            "another HyCAM: num_specialized 3 (not 0)") in line


def test_method_options_that_do_not_fit_are_named(checkpoint, capsys):
    meta = json.loads((checkpoint / "method.json").read_text())
    (checkpoint / "method.json").write_text(json.dumps({**meta, "options": {**meta["options"], "ranks": 8}}))
    assert f"{checkpoint / 'method.json'}: 'options' does not fit MethodOptions" in error_line(checkpoint, capsys)


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--limit", "x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hycam-eval: error: argument --limit: invalid int value: 'x' (see --help)"]
