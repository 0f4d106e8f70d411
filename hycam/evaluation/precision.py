"""Whether bfloat16 is the fast choice on a device: hycam-eval's default dtype (`--dtype auto`).

On CUDA, bf16 runs in hardware from compute capability 8.0 (Ampere). On a CPU it is fast only with
AVX512-BF16 or AMX-BF16 instructions (x86 servers since about 2020: Cooper Lake, Sapphire Rapids,
AMD Zen 4); elsewhere torch emulates it and fp32 is as fast or faster. On the project's Zen 4 machine
a SmolLM2 training step takes 0.6 times as long in bf16 as in fp32 (docs/PERFORMANCE.md).

Only evaluation asks: training's `bf16` default is whether CUDA is available (`hycam.train`).
"""

from __future__ import annotations

from pathlib import Path

import torch

_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True if the CPU lists AVX512-BF16 or AMX-BF16 among its flags (Linux; False where unknown)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return any(flag in flags for flag in _CPU_FLAGS)


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()
