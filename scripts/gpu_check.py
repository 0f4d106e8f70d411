"""GPU readiness: HyCAM's fast path against its reference forward, then step time, memory and decoding.

    bash scripts/gpu_check.sh                    # CUDA: SmolLM2-135M, Qwen2.5-0.5B, a 2-layer 7B shape
    bash scripts/gpu_check.sh --device cpu       # the same code on a tiny config, in seconds

Needs only torch, transformers, peft, safetensors and pyyaml: no DeepSpeed, no network, no weights
(every model is built from its config with random weights of the real shapes). First, for each shape
and for float32 and bfloat16, one HyCAM module's fast path (`hycam.fast`: training, inference and a
decoding step's single token) and its gradients are compared with the module's reference forward
(Eq. 8-11 as the paper writes them) in float64 on the same device. Then floor, HyCAM and peft LoRA are measured
side by side (`hycam.evaluation.speed`): training step, peak memory, greedy KV-cache decoding.
Writes <out>/gpu_check.json and <out>/gpu_check.md; exits 1 if a check is out of tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers

import hycam
from hycam.cam import HyCAM
from hycam.evaluation import speed

SHAPES = {  # (family, config): the models' published shapes; weights are random
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "7b-2layers": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
}
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
METHODS = ("floor", "hycam", "lora")
# Largest |fast - reference| over the largest |reference|, per quantity. float32 is a rounding-error bound;
# bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004) and rounds every intermediate.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda (default when there is a GPU) or cpu")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: the three real shapes on CUDA, "
                   "tiny on CPU")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="of the timings")
    p.add_argument("--batch", type=int, help="training batch (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--seq-len", type=int, help="training tokens per row (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--repeats", type=int, help="timed rounds of training steps and of decoding")
    p.add_argument("--new-tokens", type=int, help="decoded tokens per round (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--out", default="gpu_check_out", help="directory for gpu_check.json and gpu_check.md")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not cuda:
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    defaults = dict(shapes=["smollm2-135m", "qwen2.5-0.5b", "7b-2layers"], batch=4, seq_len=512, repeats=5,
                    new_tokens=64) if on_cuda else dict(shapes=["tiny"], batch=2, seq_len=32, repeats=2, new_tokens=8)
    for name, value in defaults.items():
        setattr(args, name, getattr(args, name) or value)
    return args


def random_model(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model of `shape` with random weights, frozen, built directly on `device`."""
    family, settings = SHAPES[shape]
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config_class(**settings, pad_token_id=0))
    return model.to(dtype).requires_grad_(False)


def relative_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; infinite when `got` is missing (a gradient that never arrived)."""
    if got is None:
        return math.inf
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_fused(hidden_size: int, device: str, dtype: torch.dtype, tokens: int = 64) -> dict[str, float]:
    """Relative error of the fast path in `dtype` against the reference forward in float64: outputs and every
    gradient."""
    torch.manual_seed(0)
    cam = HyCAM(hidden_size, hycam.HyCAMConfig(init_std=0.02), device=device, dtype=dtype).eval()
    reference = copy.deepcopy(cam).double()
    h = torch.randn(2, tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    h64 = h.detach().double().requires_grad_()
    want = reference.reference_forward(h64)[0]
    grad_out = torch.randn_like(want)
    want.backward(grad_out)
    got = cam(h)[0]  # eager: the fast path
    got.backward(grad_out.to(dtype))
    with torch.no_grad():
        errors = {"output (training path)": relative_error(got, want),
                  "output (inference path)": relative_error(cam(h)[0], want),
                  "output, one token (decoding)": relative_error(cam(h[:1, -1:])[0], want[:1, -1:])}
    errors["gradient of h_norm"] = relative_error(h.grad, h64.grad)
    wanted = dict(reference.named_parameters())
    errors |= {f"gradient of {name}": relative_error(p.grad, wanted[name].grad) for name, p in cam.named_parameters()}
    return errors


def checks(args) -> list[dict]:
    out = []
    for shape in args.shapes:
        for dtype in ("float32", "bfloat16"):
            errors = check_fused(SHAPES[shape][1]["hidden_size"], args.device, getattr(torch, dtype))
            worst = max(errors.values())
            out.append({"shape": shape, "dtype": dtype, "relative_errors": errors, "max_relative_error": worst,
                        "tolerance": TOLERANCE[dtype], "ok": worst <= TOLERANCE[dtype]})
    return out


def measure(shape: str, args) -> dict[str, dict]:
    """Peak memory (one method at a time), then step times and decoding speeds measured round-robin."""
    dtype = getattr(torch, args.dtype)
    base = random_model(shape, args.device, dtype)
    batch = speed.make_batch(base.config.vocab_size, args.batch, args.seq_len, args.device)
    rows = {m: speed.training_peak(m, base, dtype, batch, steps=2) for m in METHODS}
    runs = {m: speed.build(m, base, dtype) for m in METHODS}
    steps = speed.timed_steps(runs, batch, warmup=1, repeats=args.repeats)
    ids = speed.make_batch(base.config.vocab_size, 1, 64, args.device)["input_ids"]
    decoding = speed.decode_rates({m: run[0] for m, run in runs.items()}, ids, args.new_tokens, args.repeats)
    for m in METHODS:
        rows[m] |= {**steps[m], "train_tokens_per_s": args.batch * args.seq_len / steps[m]["step_s"],
                    "decode_tokens_per_s": decoding[m]["tokens_per_s"], "decode_all": decoding[m]["all"],
                    "params": speed.param_counts(runs[m][0])}
    return rows


CHECK_HEADER = ["| shape | dtype | max relative error, fast vs reference (float64) | tolerance | ok |",
                "|---|---|---:|---:|---|"]
SPEED_HEADER = ["| shape | method | trainable params | step (s) | train tokens/s | peak MB | over model MB | "
                "decode tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]


def markdown(result: dict) -> str:
    a = result["settings"]
    lines = [f"`{result['command']}` ({result['elapsed_s']:.0f} s)", "", f"Machine: {result['machine']}", "",
             *CHECK_HEADER]
    lines += [f"| {c['shape']} | {c['dtype']} | {c['max_relative_error']:.2e} | {c['tolerance']:.0e} | "
              f"{'yes' if c['ok'] else 'NO'} |" for c in result["checks"]]
    lines += ["", f"{a['dtype']}; training batch {a['batch']} x {a['seq_len']} tokens; greedy decoding of "
              f"{a['new_tokens']} tokens after 64, batch 1, KV cache; medians of {a['repeats']} rounds.", "",
              *SPEED_HEADER]
    for shape, rows in result["speed"].items():
        lines += [f"| {shape} | {m} | {r['params']['trainable']:,} | {r['step_s']:.4f} | "
                  f"{r['train_tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['over_model_mb']:.0f} | "
                  f"{r['decode_tokens_per_s']:.1f} |" for m, r in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, start = parse_args(argv), time.perf_counter()
    result = {"command": "bash scripts/gpu_check.sh " + " ".join(argv), "machine": speed.machine_info(args.device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "checks": checks(args)}
    result["speed"] = {shape: measure(shape, args) for shape in args.shapes}
    result["elapsed_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    failed = [f"{c['shape']} {c['dtype']}" for c in result["checks"] if not c["ok"]]
    if failed:
        print(f"gpu_check: the fast path is out of tolerance for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
