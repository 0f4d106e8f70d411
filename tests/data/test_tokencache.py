"""hycam.data.tokencache: datasets.map tokenisation equals tokenize_records, and a rerun reads the cache."""

import pytest
from conftest import save_tiny_tokenizer

from hycam.data import synthetic_tasks, tokenize_cached, tokenize_records
from hycam.data import tokencache

RECORDS = synthetic_tasks(6, seed=1)
SETTINGS = [dict(max_length=80, template="chat"), dict(max_length=80, template="plain", loss_on="all"),
            dict(max_length=100, template="authors", overflow="skip")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("settings", SETTINGS)
def test_cached_tokenisation_is_tokenize_records(tokenizer, settings, tmp_path):
    expected = tokenize_records(RECORDS, tokenizer, **settings)
    got = tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path, **settings)
    assert got[0] == expected[0]
    assert got[1] == expected[1]


def test_the_settings_cover_every_outcome(tokenizer):
    stats = tokenize_records(RECORDS, tokenizer, **SETTINGS[0])[1]
    assert all(sum(counts.values()) > 0 for counts in (stats.kept, stats.truncated, stats.skipped))


def test_a_rerun_reads_the_cache_and_a_changed_setting_does_not(tokenizer, tmp_path, monkeypatch):
    first = tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path, **SETTINGS[0])

    def refuse(*args):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(tokencache, "tokenize_with", refuse)
    assert tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path, **SETTINGS[0]) == first
    for changed in ({**SETTINGS[0], "max_length": 81}, {**SETTINGS[0], "template": "plain"}):
        with pytest.raises(AssertionError, match="tokenised again"):
            tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path, **changed)
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_cached(RECORDS[:-1], tokenizer, cache_dir=tmp_path, **SETTINGS[0])


def test_two_processes_give_the_one_process_result(tokenizer, tmp_path):
    one = tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path / "one", **SETTINGS[0])
    assert tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path / "two", num_proc=2, **SETTINGS[0]) == one
    assert len(list((tmp_path / "two").glob("*_of_00002.arrow"))) == 2


def test_bad_num_proc_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="num_proc must be an int >= 1"):
        tokenize_cached(RECORDS, tokenizer, cache_dir=tmp_path, num_proc=0, **SETTINGS[0])
