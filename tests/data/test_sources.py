"""hycam.data.sources: saved datasets read as task files are, hub:NAME and missing paths fail naming them."""

import json

import datasets
import pytest

from hycam.data import DataError, load_records, load_sources, split_records, synthetic_tasks

ROWS = [{"task": "qa", "instruction": f"Question {i}?", "input": "" if i % 2 else f"context {i}", "output": f"A{i}."}
        for i in range(12)] + [{"task": "sum", "instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
                              for i in range(9)]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_a_saved_dataset_gives_the_records_and_split_of_its_json_lines_file(task_file, tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    expected = load_records(task_file)
    got = load_sources([tmp_path / "saved"])
    assert got == expected
    assert split_records(got, seed=5) == split_records(expected, seed=5)


def test_a_saved_dataset_dict_gives_every_split_in_its_order(task_file, tmp_path):
    whole = datasets.Dataset.from_list(ROWS)
    parts = datasets.DatasetDict({"train": whole.select(range(15)), "test": whole.select(range(15, 21))})
    parts.save_to_disk(str(tmp_path / "saved"))
    assert load_sources([str(tmp_path / "saved")]) == load_records(task_file)


def test_a_dataset_without_a_task_column_is_one_task_named_after_the_folder(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "task"} for row in ROWS[:3]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "my_task"))
    assert {record.task for record in load_sources([tmp_path / "my_task"])} == {"my_task"}


@pytest.mark.parametrize("field, value, problem", [("input", None, "field 'input' must be a string, got null"),
                                                   ("output", " ", "field 'output' is empty")])
def test_a_bad_row_of_a_saved_dataset_is_named(tmp_path, field, value, problem):
    rows = [dict(row) for row in ROWS]
    rows[16][field] = value
    parts = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:15]),
                                  "test": datasets.Dataset.from_list(rows[15:])})
    parts.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError) as caught:
        load_sources([tmp_path / "saved"])
    assert str(caught.value) == f"{tmp_path / 'saved'} [test], row 1: {problem}"


@pytest.mark.parametrize("good", [0, 1])
def test_a_missing_path_is_named_even_among_existing_ones(task_file, tmp_path, good):
    typo = tmp_path / "taks.jsonl"
    with pytest.raises(DataError) as caught:
        load_sources([task_file] * good + [typo])
    assert str(caught.value).startswith(f"{typo}: no such file or folder")


def test_synthetic_is_the_generated_set_for_the_seed_and_count(task_file):
    assert load_sources(["synthetic"], seed=3, synthetic_per_task=4) == synthetic_tasks(4, seed=3)
    assert load_sources([task_file, "synthetic"], seed=3, synthetic_per_task=4) == \
        load_records(task_file) + synthetic_tasks(4, seed=3)


def test_a_hub_dataset_that_cannot_be_reached_is_named(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    with pytest.raises(DataError, match=r"^hub:someone/no-such-set: cannot load it from the Hugging Face Hub"):
        load_sources(["hub:someone/no-such-set"])


def test_a_single_string_is_refused_not_read_letter_by_letter(task_file):
    with pytest.raises(DataError, match="expected a list of data sources"):
        load_sources(str(task_file))
