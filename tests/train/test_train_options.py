"""main.py's options: YAML and CLI values converted to their types where they are read, and bad
ones refused before anything starts, in one line naming the file, the key and what is wrong."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA, standalone_env

from hycam.train import loop
from hycam.train.config import CHOICES, TrainConfig, parse_args
from test_guards import free_port

from test_train import FAST


def error_of(argv, capsys) -> str:
    """The one stderr line of a refused command line (exit code 2)."""
    with pytest.raises(SystemExit) as stop:
        loop.cli(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_yaml_values_are_converted_to_the_option_types(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nmax_steps: '7'\nresume: 'yes'\neval_batch_size: null\ndata: one/path\n")
    cfg = parse_args(["--config", str(config)])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.eval_batch_size, cfg.data) == (1e-4, 7, True, None, ["one/path"])
    assert type(cfg.lr) is float and type(cfg.max_steps) is int


@pytest.mark.parametrize("text, expected", [
    ("weight_decay: abc\n", "weight_decay: expected a number, got 'abc'"),
    ("balance_coef: -0.5\n", "balance_coef: must be >= 0, got -0.5"),
    ("grad_clip: [1.0]\n", "grad_clip: expected a number, got [1.0]"),
    ("max_steps: 2.5\n", "max_steps: expected an integer, got 2.5"),
    ("gradient_checkpointing: maybe\n", "gradient_checkpointing: expected true or false, got 'maybe'"),
    ("lr: null\n", "lr: may not be null"),
    ("learning_rate: 1e-4\n", "unknown options ['learning_rate']"),
])
def test_a_bad_yaml_value_is_named_with_its_file_and_key(text, expected, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = error_of(["--config", str(config), "--output_dir", str(tmp_path / "out")], capsys)
    assert str(config) in line and expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--eval_interval", "0"], "--eval_interval must be >= 1, got 0"),
    (["--max_steps", "0"], "--max_steps must be >= 1 or null, got 0"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--fold", "5"], "--fold must be below --num_folds 5, got 5"),
    (["--dist_timeout", "0"], "--dist_timeout must be > 0, got 0.0"),
])
def test_a_bad_command_line_value_is_named(argv, expected, tmp_path, capsys):
    assert expected in error_of([*argv, "--output_dir", str(tmp_path / "out")], capsys)


def test_the_command_line_overrides_the_yaml_and_the_yaml_range_error_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("warmup_ratio: 1.5\n")
    assert parse_args(["--config", str(config), "--warmup_ratio", "0.1"]).warmup_ratio == 0.1
    assert f"{config}: warmup_ratio: must be in [0, 1), got 1.5" in error_of(["--config", str(config)], capsys)


def test_the_shell_command_prints_one_line_and_exits_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"lr": "1e-4", "weight_decay": "heavy"}))
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"main.py: error: {config}: weight_decay: expected a number, got 'heavy' "
                                   "(see --help)")


def test_a_malformed_task_file_is_one_line_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "t", "instruction": "i", "input": "", "output": "o"}) + "\n{\"task\": 3}\n")
    line = error_of(["--model", str(tiny_model_dir), "--data", str(bad), "--output_dir", str(tmp_path / "out")],
                    capsys)
    assert line.startswith("main.py: error: ") and str(bad) in line and ("line 2" in line or f"{bad}:2" in line)


def test_a_training_split_smaller_than_one_batch_of_every_rank_stops_with_the_numbers(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "main.py"), "--model", str(tiny_model_dir), "--data", str(SHARED_DATA),
               "--output_dir", str(tmp_path / "out"), *FAST, "--micro_batch_size", "8"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=standalone_env(), timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("main.py: error:")]
    assert errors == ["main.py: error: --micro_batch_size the training split has 9 records, fewer than one batch of "
                      "--micro_batch_size 8 x 2 ranks = 16; lower --micro_batch_size or give it more records"]
    assert "exitcode  : 2" in done.stderr  # torchrun's report of its ranks (it used to look for a batch for ever)


def test_python_main_py_help_lists_every_option_and_the_values_it_takes():
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert {f"--{f.name}" for f in dataclasses.fields(TrainConfig)} | {"--config"} <= set(words)
    text = " ".join(words)  # argparse wraps the help
    for values in CHOICES.values():
        assert f"One of: {', '.join(map(str, values))}." in text
    assert "One of: auto, chat, plain, authors. (default: auto)" in text
