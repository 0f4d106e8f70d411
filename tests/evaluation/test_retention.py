"""Knowledge retention: the general-text NLL of a tiny model, and the passages taken from gensim's sample."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from hycam.evaluation import retention

TEXTS = ["The cat sat on the mat.", "Let's think step by step about a much longer sentence than the first one.",
         "The answer is"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def direct_nll(model, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")), ids.size(1) - 1


def test_each_passage_scores_every_token_after_the_first_whatever_the_batch(tiny):
    model, tokenizer = tiny
    rows = retention.score_texts(model, tokenizer, TEXTS, max_length=12, batch_size=3)
    alone = retention.score_texts(model, tokenizer, TEXTS, max_length=12, batch_size=1)
    for text, row, single in zip(TEXTS, rows, alone):
        nll, tokens = direct_nll(model, tokenizer, text, 12)
        assert (row["task"], row["tokens"]) == ("general", tokens)
        assert row["nll"] == pytest.approx(nll, rel=1e-5) and single["nll"] == pytest.approx(nll, rel=1e-5)
    assert rows[1]["tokens"] == 11  # cut at max_length
    assert len({row["id"] for row in rows}) == 3
    assert [row["id"] for row in rows] == [hashlib.sha1(text.encode()).hexdigest()[:12] for text in TEXTS]


def test_the_score_command_writes_the_base_models_record(tiny_model_dir, tmp_path):
    texts = tmp_path / "general.jsonl"
    texts.write_text("".join(json.dumps({"title": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "base.json"
    assert retention.main(["score", "--texts", str(texts), "--base-model", str(tiny_model_dir), "--max-length",
                           "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["method"], result["seed"], len(result["records"])) == ("base", None, 3)
    total = sum(r["nll"] for r in result["records"]) / sum(r["tokens"] for r in result["records"])
    assert result["nll"] == pytest.approx(total, rel=1e-12)


def test_a_bad_texts_line_is_named(tmp_path):
    texts = tmp_path / "general.jsonl"
    texts.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(SystemExit, match="line 2"):
        retention.read_texts(texts)


def test_prose_paragraphs_drop_markup_and_short_lines():
    plain = ("Title line\n\n'''Albedo''' () is the ''diffuse'' reflectivity of a surface, measured from 0 to 1.\n\n"
             "{| class=wikitable | a table row that is long enough to count otherwise |}\n\nShort.")
    assert retention.prose_paragraphs(plain, 40) == ["Albedo is the diffuse reflectivity of a surface, measured "
                                                     "from 0 to 1."]


def test_the_passages_come_from_gensims_wikipedia_sample():
    pytest.importorskip("gensim")
    passages = retention.wikipedia_passages(200)
    assert len(passages) == 99  # every article of the sample with 400 characters of prose
    assert passages[0]["title"] == "Anarchism" and passages[0]["text"].startswith("Anarchism is a political")
    assert len({p["title"] for p in passages}) == 99
    assert all(len(p["text"]) >= 400 and not retention.MARKUP.search(p["text"]) for p in passages)
