"""The 4-bit part of the GPU check (scripts/gpu_check.sh runs it where bitsandbytes is installed): HyCAM on a
bitsandbytes NF4 base (double quantisation, bf16 compute) of each shape of scripts/gpu_check.py.

For each shape, random bf16 weights are saved once and loaded twice: as they are and quantized to 4 bits.
Checked: HyCAM's parameters join the 4-bit base in bf16; one training step gives a finite loss and reaches
every router; `hycam.save` then `hycam.load` onto a fresh 4-bit base gives the same logits. Measured, both
bases side by side: bytes of the weights, peak memory of two training steps from before the load, and the
median step time. Takes gpu_check.py's options; writes <out>/gpu_check_quantized.json and .md; exits 1 if a
check fails.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import hycam
from gpu_check import parse_args, random_model
from hycam.cam import HyCAM
from hycam.data.models import load_model
from hycam.evaluation import speed

BASES = ("bf16", "4bit")
CONFIG = hycam.HyCAMConfig(init_std=0.02)


def load(directory: str, base: str, device: str) -> torch.nn.Module:
    """HyCAM on the saved weights, as they are or in 4 bits (bitsandbytes places them on the GPU itself)."""
    model = load_model(directory, dtype=torch.bfloat16, quantization="none" if base == "bf16" else base)
    return hycam.apply(model.to(device) if base == "bf16" else model, CONFIG).train()


def measured(directory: str, base: str, args) -> tuple[torch.nn.Module, dict]:
    """The model, and its weights' bytes, peak memory over loading and two steps, and median step time."""
    start = speed.memory_mark(args.device)
    model = load(directory, base, args.device)
    optimizer = torch.optim.AdamW(hycam.trainable_parameters(model).values(), lr=1e-5)
    batch = speed.make_batch(model.config.vocab_size, args.batch, args.seq_len, args.device)
    times = [speed.train_step(model, optimizer, batch)[0] for _ in range(1 + args.repeats)][1:]
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    return model, {"weights_mb": weights, "peak_mb": speed.memory_peak(args.device) - start,
                   "step_s": statistics.median(times)}


def checks(model: torch.nn.Module, directory: str, args) -> dict[str, bool]:
    """What must hold for HyCAM on a 4-bit base (`model`, trained a few steps already)."""
    batch = speed.make_batch(model.config.vocab_size, args.batch, args.seq_len, args.device)
    cams = [m for m in model.modules() if isinstance(m, HyCAM)]
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    with tempfile.TemporaryDirectory() as saved:
        hycam.save(model, saved)
        restored = hycam.load(load(directory, "4bit", args.device), saved).eval()
        with torch.no_grad():
            same = torch.equal(restored(**batch).logits, model.eval()(**batch).logits)
    return {"HyCAM in bf16": all(p.dtype == torch.bfloat16 for cam in cams for p in cam.parameters()),
            "finite loss": math.isfinite(loss.item()),
            "every router has a gradient": all(cam.W_in.grad[-cam.num_specialized:].abs().sum() > 0
                                               for cam in cams),  # CONFIG trains the router: W_in holds its rows
            "save, load onto a fresh 4-bit base: same logits": same}


def check_shape(shape: str, args) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        random_model(shape, "cpu", torch.bfloat16).save_pretrained(directory)
        rows = {}
        for base in BASES:
            model, rows[base] = measured(directory, base, args)
            if base == "4bit":
                rows["checks"] = checks(model, directory, args)
            del model
    return rows


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}`", "", "| shape | base | weights MB | peak MB | step (s) |",
             "|---|---|---:|---:|---:|"]
    for shape, rows in result["shapes"].items():
        lines += [f"| {shape} | {b} | {rows[b]['weights_mb']:.1f} | {rows[b]['peak_mb']:.0f} | "
                  f"{rows[b]['step_s']:.4f} |" for b in BASES]
    lines += ["", "| shape | check | ok |", "|---|---|---|"]
    lines += [f"| {shape} | {name} | {'yes' if ok else 'NO'} |" for shape, rows in result["shapes"].items()
              for name, ok in rows["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = {"command": "python scripts/gpu_check_quantized.py " + " ".join(argv),
              "shapes": {shape: check_shape(shape, args) for shape in args.shapes}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_quantized.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check_quantized.md").write_text(markdown(result))
    print(markdown(result))
    failed = [f"{shape}: {name}" for shape, rows in result["shapes"].items()
              for name, ok in rows["checks"].items() if not ok]
    if failed:
        print(f"gpu_check_quantized: failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
