"""From a task record to model input: prompt text, token ids with response-only labels, batches.

Three prompt templates:

- ``"chat"``: the tokenizer's own chat template, the instruction (and input) as the user turn. Right
  for instruction-tuned models, which are evaluated with the same template.
- ``"plain"``: DeepSpeed-Chat's convention, ``" Human: {instruction}\\n{input} Assistant: {output}"``.
  As in DeepSpeed-Chat (``get_prompt`` ends with ``"Assistant:"``, ``get_chosen`` starts with
  ``" "``) the space belongs to the response, so the response's first word keeps its usual
  space-prefixed token and generation starts right after the colon.
- ``"authors"``: what the authors' HyCAM code does for these tasks (``AlpacaCotDataset`` in its
  ``modified_dschat/utils/data/raw_datasets.py``): the Stanford Alpaca prompt, the output appended
  with no separator, then the EOS token. Their multi-round variant (instructions holding both
  "Human:" and "Assistant:") is left out: no record of the five tasks has that form.

``"auto"`` is ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hycam.data.batching import IGNORE_INDEX
from hycam.data.records import Record

TEMPLATES = ("auto", "chat", "plain", "authors")
LOSS_ON = ("response", "all")
"""Which tokens the loss covers: the response only (the paper's Eq. 12) or every token (the authors' code)."""
OVERFLOW = ("truncate", "skip")
"""What happens to a record longer than max_length: its response cut, or the record skipped."""

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def resolve_template(tokenizer: Any, template: str = "auto") -> str:
    """The concrete template name ("chat", "plain" or "authors") that ``template`` means here."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat_template; use 'plain', 'authors' or 'auto'")
    return template


def format_example(record: Record, tokenizer: Any, template: str = "auto") -> tuple[str, str]:
    """The prompt and the response text; the model is trained on prompt + response + EOS."""
    name = resolve_template(tokenizer, template)
    if name == "chat":
        user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt, record.output
    if name == "plain":
        body = record.instruction if not record.input else f"{record.instruction}\n{record.input}"
        return f" Human: {body} Assistant:", " " + record.output
    alpaca = _ALPACA_WITH_INPUT if record.input else _ALPACA_NO_INPUT
    return alpaca.format(instruction=record.instruction, input=record.input), record.output


def format_prompt(record: Record, tokenizer: Any, template: str = "auto") -> str:
    """The text a model is given to answer ``record`` (tokenise it with ``prompt_ids``)."""
    return format_example(record, tokenizer, template)[0]


@dataclass(frozen=True)
class TokenPlan:
    """Validated tokenisation settings, resolved once for a whole data set."""

    template: str
    special_prefix: list[int]
    eos_id: int
    max_length: int
    loss_on: str
    overflow: str


def token_plan(tokenizer: Any, max_length: int, template: str, loss_on: str, overflow: str) -> TokenPlan:
    """The settings checked (a ValueError names the bad one) and the template resolved for `tokenizer`."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: set tokenizer.eos_token first")
    name = resolve_template(tokenizer, template)
    return TokenPlan(name, _special_prefix(tokenizer, name), tokenizer.eos_token_id, max_length, loss_on, overflow)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer: Any, template: str) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Llama-2/3, none for Qwen2 or SmolLM2).

    Empty for "chat": a chat template writes its own BOS into the text.
    """
    if template == "chat":
        return []
    bare = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    return []


def _split_ids(record: Record, tokenizer: Any, plan: TokenPlan) -> tuple[list[int], list[int]]:
    """Prompt ids exactly as generation sees them, and the response ids that follow them.

    The full text is tokenised once so the response gets its natural in-context tokens. Where the
    tokenizer merges characters across the boundary (e.g. "Response:" + ":)" gives "::"), the
    full text no longer starts with the prompt's ids; the response is then tokenised on its own.
    """
    prompt, response = format_example(record, tokenizer, plan.template)
    head = _encode(tokenizer, prompt)
    full = _encode(tokenizer, prompt + response)
    tail = full[len(head):] if full[:len(head)] == head else _encode(tokenizer, response)
    return plan.special_prefix + head, tail


def prompt_ids(record: Record, tokenizer: Any, template: str = "auto") -> list[int]:
    """The prompt's token ids as training saw them: feed these to ``generate`` at evaluation."""
    name = resolve_template(tokenizer, template)
    return _special_prefix(tokenizer, name) + _encode(tokenizer, format_prompt(record, tokenizer, name))


def tokenize_with(record: Record, tokenizer: Any, plan: TokenPlan) -> tuple[dict | None, str]:
    """The example and what happened to it: "kept", "truncated" or "skipped"."""
    prompt, response = _split_ids(record, tokenizer, plan)
    response = response + [plan.eos_id]
    outcome = "kept"
    if len(prompt) + len(response) > plan.max_length:
        if plan.overflow == "skip" or len(prompt) >= plan.max_length:
            return None, "skipped"
        # Cut the response (and with it the EOS: the answer did not end there).
        response, outcome = response[: plan.max_length - len(prompt)], "truncated"
    input_ids = prompt + response
    context = [IGNORE_INDEX] * len(prompt) if plan.loss_on == "response" else prompt
    example = {"input_ids": input_ids, "labels": context + response,
               "attention_mask": [1] * len(input_ids), "task": record.task}
    return example, outcome


def tokenize_record(record: Record, tokenizer: Any, max_length: int, template: str = "auto",
                    loss_on: str = "response", overflow: str = "truncate") -> dict | None:
    """One training example: ``input_ids``, ``labels``, ``attention_mask`` (lists) and ``task``.

    Labels are -100 on the prompt (``loss_on="response"``, the paper's Eq. 12) or copy every token
    (``loss_on="all"``, the authors' code). EOS follows the response. When prompt + response + EOS
    exceed ``max_length``: ``overflow="truncate"`` cuts the response, or skips the record if the
    prompt leaves no room for a response token; ``overflow="skip"`` skips it. Skipped gives None.
    """
    plan = token_plan(tokenizer, max_length, template, loss_on, overflow)
    return tokenize_with(record, tokenizer, plan)[0]


@dataclass
class TokenizeStats:
    """Per task, how many records were kept whole, kept with a truncated response, or skipped."""

    kept: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        tasks = sorted(set(self.kept) | set(self.truncated) | set(self.skipped))
        return "; ".join(f"{task}: kept {self.kept[task]}, truncated {self.truncated[task]}, "
                         f"skipped {self.skipped[task]}" for task in tasks)


def tokenize_records(records: list[Record], tokenizer: Any, max_length: int, template: str = "auto",
                     loss_on: str = "response", overflow: str = "truncate") -> tuple[list[dict], TokenizeStats]:
    """``tokenize_record`` over a data set, with the counts a run should report."""
    plan = token_plan(tokenizer, max_length, template, loss_on, overflow)
    examples, stats = [], TokenizeStats()
    for record in records:
        example, outcome = tokenize_with(record, tokenizer, plan)
        getattr(stats, outcome)[record.task] += 1
        if example is not None:
            examples.append(example)
    return examples, stats
