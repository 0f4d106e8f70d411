"""Scoring chosen records with a loaded model: response PPL, BLEU-4 and ROUGE-L per task, and each
record's response NLL under an id (what `hycam.evaluation.paired` compares two runs by).

PPL is token-level per task: exp(summed NLL of every response token of the task / their number),
not a mean of per-sample perplexities (long answers weigh more, as in a language-model PPL).
BLEU-4 (corpus-level) and ROUGE-L score greedy generations against the reference outputs. The
average is the unweighted mean over tasks of each task's number, as the paper reports averages
over its five tasks.
"""

from __future__ import annotations

import hashlib
import statistics

from torch import nn

from hycam.data import Record, prompt_ids, tokenize_record
from hycam.evaluation import tables
from hycam.evaluation.generation import greedy_generate, record_nll
from hycam.evaluation.metrics import bleu4, perplexity, rouge_l
from hycam.evaluation.selection import EvalOptions, UsageError


def record_id(*texts: str) -> str:
    """A short hash of a record's text fields: paired comparisons check that two runs scored the same
    records. One field (a retention passage) hashes as its text alone."""
    return hashlib.sha1("\x1f".join(texts).encode()).hexdigest()[:12]


def score(model: nn.Module, tokenizer, by_task: dict[str, list[Record]],
          options: EvalOptions) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """Per-task metrics, every generation, and each scored record's response NLL, of records chosen.
    A record too long to score (`fitting`) is left out of every metric and counted as "skipped"."""
    if options.generate_limit is not None and options.generate_limit < 1:
        raise UsageError(f"--generate-limit must be >= 1, got {options.generate_limit}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fit = fitting(model, tokenizer, by_task, options)
    kept = {task: [r for r, ok in zip(records, fit[task]) if ok] for task, records in by_task.items()}
    rows = _record_rows(model, tokenizer, by_task, fit, pad, options)
    generations = _generations(model, tokenizer, kept, pad, options)
    metrics = {task: {**_task_metrics(task, generations, rows, options), "scored": len(by_task[task]),
                      "skipped": len(by_task[task]) - len(kept[task])} for task in by_task}
    return metrics, generations, rows


def fitting(model: nn.Module, tokenizer, by_task: dict[str, list[Record]],
            options: EvalOptions) -> dict[str, list[bool]]:
    """Per task, whether each record's prompt fits both --max-length (PPL) and the model's context with
    --max-new-tokens after it (generation). A field longer than --max-length times the longest token's
    characters is too long whatever its tokens: it is never tokenised (a 50 MB input costs nothing)."""
    context = getattr(model.config, "max_position_embeddings", None)
    chars = options.max_length * max(map(len, tokenizer.get_vocab()))

    def fits(record: Record) -> bool:
        if max(len(record.instruction) + len(record.input), len(record.output)) > chars:
            return False
        prompt = len(prompt_ids(record, tokenizer, options.template))
        return prompt < options.max_length and (context is None or prompt + options.max_new_tokens <= context)

    try:
        return {task: [fits(r) for r in records] for task, records in by_task.items()}
    except ValueError as err:  # a template the tokenizer lacks
        raise UsageError(str(err)) from err


def skipped_note(metrics: dict[str, dict], options: EvalOptions, model: nn.Module) -> str | None:
    """One line counting the records left out as too long, or None when every record was scored."""
    counts = {task: values["skipped"] for task, values in metrics.items() if values["skipped"]}
    if not counts:
        return None
    context = getattr(model.config, "max_position_embeddings", None)
    room = f" or the model's context of {context} tokens with --max-new-tokens {options.max_new_tokens}" \
        if context else ""
    return (f"skipped {sum(counts.values())} records too long for --max-length {options.max_length}{room}, "
            f"for every metric ({', '.join(f'{t}: {n}' for t, n in counts.items())})")


def average(metrics: dict[str, dict]) -> dict[str, float]:
    """Unweighted mean over tasks of each task's PPL, BLEU-4 and ROUGE-L."""
    return {m: statistics.fmean(values[m] for values in metrics.values()) for m in tables.METRICS}


def stop_tokens(model: nn.Module, tokenizer) -> list[int]:
    """EOS of the tokenizer (what training appended) and of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *configured] if t is not None))


def _record_rows(model: nn.Module, tokenizer, by_task: dict[str, list[Record]], fit: dict[str, list[bool]],
                 pad: int, options: EvalOptions) -> list[dict]:
    """Per chosen record, in order: task, id, summed response NLL and response tokens (None, 0: skipped)."""
    chosen = [(r, ok) for task, records in by_task.items() for r, ok in zip(records, fit[task])]
    examples = [tokenize_record(r, tokenizer, options.max_length, options.template) for r, ok in chosen if ok]
    scores = iter(record_nll(model, examples, pad, options.batch_size, options.progress))
    rows = []
    for r, ok in chosen:
        total, tokens = next(scores) if ok else (None, 0)
        rows.append({"task": r.task, "id": record_id(r.task, r.instruction, r.input, r.output), "nll": total,
                     "tokens": tokens})
    return rows


def _generations(model: nn.Module, tokenizer, by_task: dict[str, list[Record]], pad: int,
                 options: EvalOptions) -> list[dict]:
    """Greedy answers to each task's first `generate_limit` records, beside their references."""
    generated = [r for task_records in by_task.values() for r in task_records[:options.generate_limit]]
    prompts = [prompt_ids(r, tokenizer, options.template) for r in generated]
    outputs = greedy_generate(model, prompts, pad, stop_tokens(model, tokenizer), options.max_new_tokens,
                              options.batch_size, options.progress)
    predictions = [text.strip() for text in tokenizer.batch_decode(outputs, skip_special_tokens=True)]
    return [{"task": r.task, "instruction": r.instruction, "input": r.input, "reference": r.output,
             "prediction": p} for r, p in zip(generated, predictions)]


def _task_metrics(task: str, generations: list[dict], rows: list[dict], options: EvalOptions) -> dict:
    """PPL over the task's response tokens; corpus BLEU-4 and mean ROUGE-L of its generations."""
    nll = sum(x["nll"] for x in rows if x["task"] == task and x["nll"] is not None)
    tokens = sum(x["tokens"] for x in rows if x["task"] == task)
    if not tokens:
        raise UsageError(f"task {task!r}: every prompt is longer than --max-length {options.max_length}")
    chosen = [g for g in generations if g["task"] == task]
    predictions, references = [g["prediction"] for g in chosen], [g["reference"].strip() for g in chosen]
    return {"ppl": perplexity(nll, tokens), "bleu": bleu4(predictions, references),
            "rouge_l": rouge_l(predictions, references), "samples": len(chosen), "response_tokens": tokens}
