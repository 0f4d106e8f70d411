"""The two passes an evaluation makes over a model: response-token NLL, and batched greedy decoding.

Both sort the examples by length before batching, so a batch holds examples of similar length and
little padding; results are put back in the input order. Neither draws random numbers: with
deterministic routing (HyCAM's default at eval) the same model and data give the same numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from hycam.data import IGNORE_INDEX, collate


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (a too-large batch fails early)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _progress(batches: list, desc: str, show: bool) -> Iterator:
    return iter(tqdm(batches, desc=desc, unit="batch", disable=not show, leave=False))


@torch.no_grad()
def record_nll(model: nn.Module, examples: Sequence[dict], pad_token_id: int, batch_size: int = 4,
               progress: bool = False) -> list[tuple[float, int]]:
    """Per example, in input order: the summed NLL (natural log) of its response tokens, and their number.

    `examples` come from `hycam.data.tokenize_record(s)`; labels are -100 except on the tokens to
    score. Right padding (`collate`) leaves the scored tokens' logits untouched under causal
    attention. Each row's cross-entropy is taken on its own, in float32, so that memory stays at
    one row's `[L, vocab]` beyond the logits themselves.
    """
    device = next(model.parameters()).device
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    batches = _batches_by_length([len(e["input_ids"]) for e in examples], batch_size)
    for indices in _progress(batches, "ppl", progress):
        batch = collate([examples[i] for i in indices], pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (B, L, V)
        labels = batch["labels"].to(device)
        for row, index in enumerate(indices):
            target = labels[row, 1:]  # token t is predicted from position t - 1
            nll = F.cross_entropy(logits[row, :-1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
            scores[index] = (float(nll), int((target != IGNORE_INDEX).sum()))
    return scores


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` with every prompt ending at the last column, as decoding needs."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def _until_stop(tokens: list[int], stop: set[int], pad_token_id: int) -> list[int]:
    """The generated tokens before the first stop token (or, if none, without trailing padding)."""
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[:position]
    while tokens and tokens[-1] == pad_token_id:
        tokens = tokens[:-1]
    return tokens


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], pad_token_id: int,
                    eos_token_ids: Sequence[int], max_new_tokens: int = 128, batch_size: int = 8,
                    progress: bool = False) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), in input order, each cut before its first EOS.

    Batches are left-padded so every prompt's next token is the same column, and decoding uses the
    KV cache; a row leaves the batch (and the cache) as soon as it has produced an EOS, so the
    rows still running do not pay for finished ones. The tokens equal those of decoding each
    prompt on its own (tested).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: a prompt has no tokens")
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    for indices in _progress(_batches_by_length([len(p) for p in prompts], batch_size), "generate", progress):
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in indices], pad_token_id).items()}
        for i, tokens in zip(indices, _decode(model, batch, eos_token_ids, max_new_tokens)):
            results[i] = _until_stop(tokens, set(eos_token_ids), pad_token_id)
    return results


def _decode(model: nn.Module, batch: dict[str, torch.Tensor], eos_token_ids: Sequence[int],
            max_new_tokens: int) -> list[list[int]]:
    """The new tokens of every row of a left-padded batch, each up to and including its first EOS."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: each row's first token is position 0
    cache = new_cache(model)
    extra = cache_arguments(model, cache)
    rows, tokens = torch.arange(ids.size(0)), [[] for _ in range(ids.size(0))]
    stop = torch.tensor(list(eos_token_ids), dtype=torch.long, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra).logits
        chosen, positions = logits[:, -1].argmax(-1), positions[:, -1:] + 1  # (live rows,), (live rows, 1)
        for row, token in zip(rows.tolist(), chosen.tolist()):
            tokens[row].append(token)
        live = (~torch.isin(chosen, stop)).nonzero().squeeze(1)  # (rows still decoding,)
        if live.numel() == 0:
            break
        if live.numel() < rows.numel():  # finished rows leave the batch and the cache
            cache.batch_select_indices(live)
            rows, chosen, mask, positions = rows[live.cpu()], chosen[live], mask[live], positions[live]
        ids, mask = chosen[:, None], torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
    return tokens


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty KV cache laid out as `generate` would make it (transformers 5 reads the model's config for
    sliding-window layers; 4.x takes no config). Every forward fills it in place."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def cache_arguments(model: nn.Module, cache: DynamicCache) -> dict:
    """The cache under the name this transformers takes (`cache` since 5.2x, `past_key_values` before),
    and the argument that makes the LM head score only the last position (`logits_to_keep` since
    4.50, `num_logits_to_keep` before; at prefill the full `[B, L, vocab]` logits cost more than the
    rest of the step), as far as the model's forward names them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft forwards **kwargs
    names = inspect.signature(inner.forward).parameters
    arguments = {"cache" if "cache" in names else "past_key_values": cache}
    return arguments | next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in names), {})
