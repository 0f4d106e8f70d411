"""main.py's --data through the real CLI: a missing path stops the run naming it (issue 11, item 3);
saved datasets and the generated set train like task files."""

import json
import subprocess
import sys

import datasets
import pytest
from conftest import REPO, standalone_env

from hycam.data import load_records, synthetic_tasks
from hycam.train import loop
from hycam.train.config import TrainConfig
from hycam.train.splits import load_task_records

FAST = ["--max_records_per_task", "3", "--max_length", "512", "--micro_batch_size", "2", "--grad_accum", "1",
        "--rank", "8", "--num_specialized", "3", "--max_eval_records_per_task", "1", "--patience", "0",
        "--max_steps", "1", "--eval_interval", "1"]


def task_file(path, records):
    path.write_text("".join(json.dumps(vars(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("existing", [0, 2])
def test_a_missing_data_path_stops_python_main_py_naming_it(tiny_model_dir, tmp_path, existing):
    good = [str(task_file(tmp_path / f"good{i}.jsonl", synthetic_tasks(4, seed=i))) for i in range(existing)]
    typo = tmp_path / "tasks" / "godo.jsonl"
    command = [sys.executable, str(REPO / "main.py"), "--model", str(tiny_model_dir), "--data", *good[:1], str(typo),
               *good[1:], "--output_dir", str(tmp_path / "out"), *FAST]
    done = subprocess.run(command, cwd=REPO, env=standalone_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert f"{typo}: no such file or folder" in done.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "run_config.json").exists()


def test_synthetic_is_the_generated_set_capped_like_any_data():
    cfg = TrainConfig(data=["synthetic"], max_records_per_task=6, seed=11)
    assert load_task_records(cfg, print) == synthetic_tasks(6, seed=11)


def test_a_saved_dataset_trains_like_its_task_file(tiny_model_dir, tmp_path):
    records = synthetic_tasks(4, seed=0)
    datasets.Dataset.from_list([vars(r) for r in records]).save_to_disk(str(tmp_path / "saved"))
    file = task_file(tmp_path / "tasks.jsonl", records)
    assert load_task_records(TrainConfig(data=[str(tmp_path / "saved")]), print) == load_records(file)
    progress, _ = loop.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "saved"),
                             "--output_dir", str(tmp_path / "out"), *FAST])
    assert progress.step == 1
    splits = [json.loads(line)["split"] for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert splits == ["train", "validation"]
