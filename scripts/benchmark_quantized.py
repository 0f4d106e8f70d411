"""Peak memory and step time of HyCAM training on a bitsandbytes 4-bit (NF4, double quantisation) base against
the same base in bf16: what QLoRA-style loading saves and what it costs.

    python scripts/benchmark_quantized.py                        # SmolLM2-135M-Instruct, CPU
    python scripts/benchmark_quantized.py --model Qwen/Qwen2.5-0.5B --device cuda

Each base is measured in a fresh subprocess (`child`): memory above the process before the model loads (on
CPU the resident set, on CUDA allocated memory), in use after loading and adding HyCAM ('model_mb'), and at the
peak of the training steps ('peak_mb'); the median wall and CPU time of a training step (forward, backward,
AdamW on HyCAM's parameters). 'weights_mb' counts the bytes of every parameter and buffer (HyCAM's included):
the part of the memory no allocator or file mapping blurs (on CPU the resident set keeps what loading and
quantizing freed). Writes <out>/benchmark_quantized.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import hycam
from benchmark import save_base
from hycam.data.models import SMOLLM2, load_model
from hycam.evaluation import speed

BASES = ("bf16", "4bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help=f"'{SMOLLM2}', a directory or a hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="steps before timing starts")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
    p.add_argument("--out", default="benchmark_out", help="directory for benchmark_quantized.json and .md")
    p.add_argument("--child", nargs=2, metavar=("BASE", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """In a fresh process: one base (bf16 or 4-bit) with HyCAM, its memory and step time, printed as JSON."""
    base, directory = args.child
    start = speed.memory_mark(args.device)
    model = load_model(directory, dtype=torch.bfloat16, quantization="none" if base == "bf16" else base)
    if base == "bf16":
        model.to(args.device)
        for param in model.parameters():
            param.data = param.data.clone()  # off the file mapping, which the resident set would undercount
    model = hycam.apply(model).train()
    optimizer = torch.optim.AdamW(hycam.trainable_parameters(model).values(), lr=1e-5)
    loaded = speed.memory_mark(args.device)  # in use now: the transient peak of loading or quantizing is left out
    batch = speed.make_batch(model.config.vocab_size, args.batch, args.seq_len, args.device)
    steps = [speed.train_step(model, optimizer, batch) for _ in range(args.warmup + args.repeats)][args.warmup:]
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    print(json.dumps({"weights_mb": weights, "model_mb": loaded - start,
                      "peak_mb": speed.memory_peak(args.device) - start,
                      "step_s": statistics.median(wall for wall, _ in steps),
                      "cpu_s": statistics.median(cpu for _, cpu in steps)}))


def measure(args: argparse.Namespace, argv: list[str]) -> dict:
    """Both bases, each in its own subprocess, from one copy of the weights saved as safetensors (a GGUF
    file is de-quantised first: bitsandbytes quantizes floating-point weights)."""
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        save_base(load_model(args.model, dtype=torch.bfloat16), Path(directory))
        for base in BASES:
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", base, directory]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[base] = json.loads(out.strip().splitlines()[-1])
    return results


def markdown(result: dict) -> str:
    a, r = result["args"], result["bases"]
    lines = [f"`{result['command']}`", "", f"Machine: {result['machine']}", "",
             f"{a['model']}, HyCAM (paper defaults), batch {a['batch']} x {a['seq_len']} tokens, median of "
             f"{a['repeats']} steps.", "", "| base | weights MB | model MB | peak MB | step (s) | CPU (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {v['weights_mb']:.0f} | {v['model_mb']:.0f} | {v['peak_mb']:.0f} | {v['step_s']:.3f} | "
              f"{v['cpu_s']:.3f} |" for name, v in r.items()]
    lines += ["", "| ratio 4bit/bf16 | measured |", "|---|---:|"]
    lines += [f"| {key} | {value:.3f} |" for key, value in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    bases = measure(args, argv)
    ratios = {key: bases["4bit"][key] / bases["bf16"][key]
              for key in ("weights_mb", "model_mb", "peak_mb", "step_s")}
    result = {"command": "python scripts/benchmark_quantized.py " + " ".join(argv), "args": vars(args),
              "machine": {**speed.machine_info(args.device), "torch_threads": args.threads}, "bases": bases,
              "ratios": ratios}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "benchmark_quantized.json").write_text(json.dumps(result, indent=1))
    (Path(args.out) / "benchmark_quantized.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
