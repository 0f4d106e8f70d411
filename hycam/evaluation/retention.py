"""Knowledge retention: a model's NLL on general English text outside the five tasks, before and after training.

    python -m hycam.evaluation.retention texts --out general.jsonl [--count 100]
    python -m hycam.evaluation.retention score --texts general.jsonl --checkpoint RUN/best --out retention.json
    python -m hycam.evaluation.retention score --texts general.jsonl --base-model DIR --out base.json

The change of this NLL after fine-tuning is what peft's method comparison reports as forgetting (the
change of a Wikipedia cross-entropy). The text comes offline, from a package on PyPI: gensim ships, as
test data, a shortened dump of the English Wikipedia (`enwiki-latest-pages-articles1.xml-p000000010
p000030302-shortened.bz2`, 107 articles; Wikipedia's text is CC BY-SA; gensim is LGPL-2.1). `texts`
turns it into plain-prose passages once: the first paragraphs of each article, markup stripped by
gensim's `filter_wiki`. `score` writes each passage's NLL over all its tokens (`records`, in the
format of hycam-eval's results.json, so `hycam.evaluation.paired` compares runs passage by passage).
"""

from __future__ import annotations

import argparse
import bz2
import json
import re
import sys
from pathlib import Path

from torch import nn

from hycam.evaluation.generation import record_nll
from hycam.evaluation.loading import load_model_for, read_checkpoint
from hycam.evaluation.scoring import record_id
from hycam.evaluation.selection import UsageError

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MARKUP = re.compile(r"[{}|<>\[\]=]|https?:")
"""Characters that filter_wiki leaves in tables, templates and references: a paragraph with them is no prose."""


def prose_paragraphs(plain: str, min_chars: int) -> list[str]:
    """The paragraphs of filter_wiki's output that read as prose: long enough, no markup left, no bold or
    italic quotes, no empty parentheses (where a pronunciation template was)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", plain):
        text = re.sub(r"\s+", " ", block.replace("'''", "").replace("''", "")).replace(" ()", "").strip()
        if len(text) >= min_chars and not MARKUP.search(text):
            paragraphs.append(text)
    return paragraphs


def wikipedia_passages(count: int, min_chars: int = 400) -> list[dict]:
    """Up to `count` passages, one per article of gensim's Wikipedia sample in dump order (redirects
    skipped): the article's first prose paragraphs joined until `min_chars` characters."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as err:
        raise SystemExit("retention: the general text comes from gensim's Wikipedia sample: pip install gensim "
                         "(or pip install -e '.[study]')") from err
    passages = []
    with bz2.open(datapath(DUMP)) as dump:
        for title, text, _ in extract_pages(dump, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            paragraphs, taken = prose_paragraphs(filter_wiki(text), 100), []
            while paragraphs and sum(map(len, taken)) < min_chars:
                taken.append(paragraphs.pop(0))
            if sum(map(len, taken)) >= min_chars:
                passages.append({"title": title, "text": " ".join(taken)})
            if len(passages) == count:
                break
    return passages


def text_examples(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Each text as the tokenizer encodes it (its BOS if any), cut at `max_length`; every token scored."""
    examples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_length]
        examples.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids), "task": "general"})
    return examples


def score_texts(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict]:
    """Per text: the summed NLL of its tokens after the first, and their number (hycam-eval's record rows)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = record_nll(model.eval(), text_examples(texts, tokenizer, max_length), pad, batch_size)
    return [{"task": "general", "id": record_id(text), "nll": nll, "tokens": tokens}
            for text, (nll, tokens) in zip(texts, scores)]


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"retention: --texts {path}: no such file (write it with the `texts` command)")
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"retention: {path}, line {number}: expected a JSON object with 'text' ({err})")
    return texts


def score(args: argparse.Namespace) -> dict:
    """The result record of one model: method, seed, records and the token-level mean NLL."""
    if (args.checkpoint is None) == (args.base_model is None):
        raise SystemExit("retention score: pass exactly one of --checkpoint and --base-model")
    try:
        checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
        model, tokenizer = load_model_for(checkpoint, args.base_model)
    except UsageError as err:
        raise SystemExit(f"retention score: {err}") from err
    recorded = checkpoint.recorded if checkpoint else {}
    method = (args.label or recorded["method"]) if checkpoint else "base"  # --label names checkpoints only
    seed = recorded.get("seed")
    rows = score_texts(model, tokenizer, read_texts(args.texts), args.max_length, args.batch_size)
    mean = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
    return {"method": method, "seed": seed, "texts": str(args.texts), "max_length": args.max_length, "nll": mean,
            "records": rows}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hycam.evaluation.retention", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("texts", help="write the general-text passages (JSON lines {title, text})")
    sub.add_argument("--count", type=int, default=100, help="passages (one per article)")
    sub.add_argument("--out", type=Path, required=True)
    sub = commands.add_parser("score", help="NLL of a trained checkpoint or of the base model on the passages")
    sub.add_argument("--texts", type=Path, required=True, help="the passages written by `texts`")
    sub.add_argument("--checkpoint", default=None, help="checkpoint dir written by main.py")
    sub.add_argument("--base-model", default=None, help="or the untrained base model (dir, .gguf or name)")
    sub.add_argument("--label", default=None, help="method name (default: the checkpoint's)")
    sub.add_argument("--max-length", type=int, default=128, help="tokens scored per passage (the first ones)")
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "texts":
        passages = wikipedia_passages(args.count)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in passages))
        print(f"retention: {len(passages)} passages in {args.out}")
        return 0
    result = score(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"retention: {result['method']} NLL {result['nll']:.4f} nats/token on {len(result['records'])} passages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
