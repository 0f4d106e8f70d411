"""The source parsers of scripts/prepare_data.py on small fixtures, and its failure offline (no network)."""

import importlib.util
import json
import urllib.error
import urllib.request

import pytest

from conftest import REPO

from hycam.data import Record, load_records

_spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)


def _jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_parse_alpaca_array_fixture():
    text = json.dumps([{"instruction": "i", "input": "x", "output": "o"}, {"instruction": "j", "output": "p"}])
    assert prepare_data.parse_alpaca(text, "dolly") == [
        {"task": "dolly", "instruction": "i", "input": "x", "output": "o"},
        {"task": "dolly", "instruction": "j", "input": "", "output": "p"}]
    with pytest.raises(prepare_data.SourceError, match="array"):
        prepare_data.parse_alpaca('{"instruction": "i"}', "dolly")


def test_parse_webgpt_fixture():
    text = _jsonl({"query": "Q1?", "snippets": ["s"], "true_answer": " A1 . [1]"}, {"query": "Q2?", "true_answer": ""})
    assert prepare_data.parse_webgpt(text, "webgpt") == [
        {"task": "webgpt", "instruction": "Q1?", "input": "", "output": " A1 . [1]"},
        {"task": "webgpt", "instruction": "Q2?", "input": "", "output": ""}]


def test_parse_icliniq_keeps_doctor_answers_of_the_first_rows():
    rows = [{"input": f"Hello doctor, {i}?", "answer_icliniq": f"Hi. {i}", "answer_chatgpt": "AI"} for i in range(3)]
    records = prepare_data.parse_icliniq(_jsonl(*rows), "icliniq", rows=2)
    assert [(r["instruction"], r["output"]) for r in records] == [("Hello doctor, 0?", "Hi. 0"),
                                                                  ("Hello doctor, 1?", "Hi. 1")]


def test_clean_drops_repeats_and_empties_then_samples():
    rows = [{"task": "t", "instruction": f"q{i % 6}", "input": "", "output": "" if i == 1 else "a"} for i in range(9)]
    kept = prepare_data.clean(rows, max_count=None, seed=0)
    assert [r["instruction"] for r in kept] == ["q0", "q2", "q3", "q4", "q5", "q1"]  # q1's first is empty
    sample = prepare_data.clean(rows, max_count=3, seed=0)
    assert len(sample) == 3 and sample == [r for r in kept if r in sample]


def test_main_writes_files_that_load_records_reads(tmp_path, monkeypatch):
    texts = {prepare_data.SOURCES["dolly"].url: json.dumps([{"instruction": "i", "input": "c", "output": "o"}]),
             prepare_data.SOURCES["webgpt"].url: _jsonl({"query": "q", "true_answer": "a"})}
    monkeypatch.setattr(prepare_data, "fetch", texts.__getitem__)
    assert prepare_data.main(["--out", str(tmp_path), "--tasks", "dolly", "webgpt"]) == 0
    assert load_records(tmp_path) == [Record("dolly", "i", "c", "o"), Record("webgpt", "q", "", "a")]


def test_main_offline_fails_clearly_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert prepare_data.main(["--out", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "could not download https://" in message and "network" in message
    assert not (tmp_path / "out").exists()
