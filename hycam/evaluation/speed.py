"""Training-step time, peak memory and KV-cache decoding speed, measured the same way on CPU and CUDA.

`scripts/benchmark.py` and `scripts/gpu_check.py` both measure with these functions. CUDA runs
kernels asynchronously, so every timing is bracketed by `torch.cuda.synchronize` and peak memory is
`torch.cuda.max_memory_allocated`; on CPU peak memory is the process's peak resident set (Linux).
Methods: `floor` (frozen backbone, the gradient flows to the input embeddings only: the fastest any
method that trains inside the network can be), `hycam` (paper defaults), `lora` (peft, rank 64 on
every linear layer) and `full` fine-tuning.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Collection
from pathlib import Path

import peft  # loaded up front, like every library the methods use, before any memory mark
import torch
import transformers
from torch import nn

import hycam
from hycam.baselines.methods import MethodOptions, prepare
from hycam.evaluation import generation


def sync(device: torch.device | str) -> None:
    """Waits for the device's queued kernels (CUDA); a no-op on CPU, whose ops run synchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build(method: str, base: nn.Module, dtype: torch.dtype, **hycam_options) -> tuple[nn.Module, object]:
    """A fresh copy of `base` set up for `method`, in train mode, with its AdamW (None for the floor)."""
    model = copy.deepcopy(base).train()
    if method == "floor":
        model.enable_input_require_grads()  # backward runs through every layer to the embeddings
        return model, None
    if method == "hycam":
        model = hycam.apply(model, hycam.HyCAMConfig(**hycam_options)).train()
    else:
        model = prepare(model, method, MethodOptions(rank=64)).train()
    model.to(dtype)  # peft keeps adapters in float32 by default; train all in one dtype
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device_of(model).type in ("cpu", "cuda")
    return model, torch.optim.AdamW(params, lr=1e-5, fused=fused)


def make_batch(vocab_size: int, batch: int, length: int, device: torch.device | str) -> dict:
    """Random token ids (the same every call), labels equal to the inputs."""
    ids = torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model: nn.Module, optimizer, batch: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one forward + backward + optimiser step."""
    device = batch["input_ids"].device
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    model(**batch).loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def round_robin(runs: dict, measure, warmup: int, repeats: int) -> dict[str, list]:
    """measure(name, run) for every run, round after round, the order rotating; warm-up rounds dropped.

    A burst of load from elsewhere (or a GPU clock change) then hits every run alike.
    """
    names, samples = list(runs), {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            result = measure(name, runs[name])
            if i >= warmup:
                samples[name].append(result)
    return samples


def timed_steps(runs: dict, batch: dict, warmup: int, repeats: int) -> dict[str, dict]:
    """Median wall and CPU seconds of a training step of every (model, optimiser) in `runs`."""
    samples = round_robin(runs, lambda _, run: train_step(*run, batch), warmup, repeats)
    return {name: {"step_s": statistics.median(s[0] for s in got), "cpu_s": statistics.median(s[1] for s in got),
                   "step_s_all": [round(s[0], 4) for s in got]} for name, got in samples.items()}


def param_counts(model: nn.Module) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


@torch.no_grad()
def decode_rate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """New tokens per second of greedy KV-cache decoding of exactly `new_tokens` tokens after `ids`,
    the prompt's prefill included in the time."""
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    sync(ids.device)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
    sync(ids.device)
    return ids.size(0) * new_tokens / (time.perf_counter() - start)


def decode_rates(models: dict[str, nn.Module], ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s of every model in eval mode, interleaved round by round after one warm-up round."""
    models = {name: model.eval() for name, model in models.items()}
    samples = round_robin(models, lambda _, model: decode_rate(model, ids, new_tokens), 1, repeats)
    return {name: {"tokens_per_s": statistics.median(got), "all": [round(x, 3) for x in got]}
            for name, got in samples.items()}


@torch.no_grad()
def stepwise_decode_rates(models: dict[str, nn.Module], ids: torch.Tensor, new_tokens: int, rounds: int,
                          compiled: Collection[str] = ()) -> dict:
    """Tokens/s of greedy KV-cache decoding, one step of every model in turn, per round (a prefill each,
    untimed, then `new_tokens` timed steps), after one warm-up round (which also compiles).

    Interleaving by step, not by whole generation, puts every model in the same few milliseconds of the
    machine's drift. The models named in `compiled` decode with a static cache and a `torch.compile`d
    forward, as `generate` does with `cache_implementation="static"`; the others as `greedy_generate`.
    Each result also holds the last round's tokens (prefill's and every step's).
    """
    # As `generate` compiles: the module's __call__ (its hooks included), one static cache reused.
    steppers = {name: torch.compile(model.eval().__call__, fullgraph=True) if name in compiled else model.eval()
                for name, model in models.items()}
    static = {name: transformers.StaticCache(config=models[name].config, max_cache_len=ids.size(1) + new_tokens)
              for name in compiled}
    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        state, tokens, seconds = {}, {}, dict.fromkeys(models, 0.0)
        for name, model in models.items():
            if name in static:
                static[name].reset()
            cache = static[name] if name in static else generation.new_cache(model)
            extra = generation.cache_arguments(model, cache)
            logits = model(input_ids=ids, cache_position=torch.arange(ids.size(1), device=ids.device), **extra).logits
            state[name] = (extra, logits[:, -1:].argmax(-1))
            tokens[name] = [state[name][1]]
        for step in range(new_tokens):
            position = torch.tensor([ids.size(1) + step], device=ids.device)
            for name in list(models)[:: 1 if step % 2 else -1]:  # the order alternates step by step
                extra, token = state[name]
                sync(ids.device)
                start = time.perf_counter()
                logits = steppers[name](input_ids=token, cache_position=position, **extra).logits
                token = logits[:, -1:].argmax(-1)
                sync(ids.device)
                seconds[name] += time.perf_counter() - start
                state[name] = (extra, token)
                tokens[name].append(token)
        if round_:
            for name in models:
                samples[name].append(ids.size(0) * new_tokens / seconds[name])
    return {name: {"tokens_per_s": statistics.median(got), "all": [round(x, 3) for x in got],
                   "tokens": torch.cat(tokens[name], dim=1).tolist()} for name, got in samples.items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median, quartiles and range of the per-round ratios of two runs measured in the same rounds:
    pairing by round cancels the machine's drift, which moves both alike."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": low, "q3": high, "min": ratios[0], "max": ratios[-1],
            "rounds": len(ratios)}


def resident_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def memory_mark(device: torch.device | str) -> float:
    """Resets the peak-memory mark to what is in use now and returns that, in MiB.

    CUDA: allocated tensor memory. CPU: frees what Python and glibc hold, then sets the peak resident
    set to the current one (`/proc/self/clear_refs`), so that earlier work cannot set the peak.
    """
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return resident_mb("VmRSS")


def memory_peak(device: torch.device | str) -> float:
    """The peak since the last `memory_mark`, in MiB, counted the same way."""
    if torch.device(device).type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resident_mb("VmHWM")


def training_peak(method: str, base: nn.Module, dtype: torch.dtype, batch: dict, steps: int) -> dict[str, float]:
    """Peak memory of `steps` training steps of `method` on a copy of `base`: above what was in use
    before the copy ('peak_mb') and above the built model ('over_model_mb': gradients, optimiser
    state, activations). Exact on CUDA in any process; on CPU run it in a fresh process."""
    device = device_of(base)
    start = memory_mark(device)
    model, optimizer = build(method, base, dtype)
    built = memory_mark(device)
    for _ in range(steps):
        train_step(model, optimizer, batch)
    peak = memory_peak(device)
    return {"peak_mb": peak - start, "over_model_mb": peak - built}


def machine_info(device: torch.device | str) -> dict:
    """What the figures were measured on: CPU, GPU, library versions, the load average now."""
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    info = {"cpu": cpu[0] if cpu else platform.processor(), "cores": os.cpu_count(), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "load_average_start": os.getloadavg()}
    if torch.device(device).type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return info
