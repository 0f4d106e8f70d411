"""The methods the study compares: the paper's row order and names, and the families that share an LR sweep."""

from __future__ import annotations

ABLATIONS = ("shared_only", "full_spec", "spec_only", "inverse_peft")
MAIN = ("full", "lora", "multilora", "riemoe", "hycam")  # the paper's row order
NAMES = {"full": "Full Finetune", "lora": "LoRA", "multilora": "Multi LoRA", "riemoe": "RieMoE-LoRA",
         "hycam": "HyCAM", "shared_only": "Shared-CAM-Only", "full_spec": "HyCAM-FullSpec",
         "spec_only": "HyCAM-SpecOnly", "inverse_peft": "HyCAM-InversePEFT"}
PEFT_BASELINES = ("lora", "multilora", "riemoe")  # the paper's * compares with the best PEFT baseline
FAMILIES = {"hycam": ("hycam", *ABLATIONS), "lora": ("lora",), "multilora": ("multilora",),
            "riemoe": ("riemoe",), "full": ("full",)}
"""Methods that share one LR sweep: the HyCAM variants take HyCAM's LR."""


def family(method: str) -> str:
    return next(name for name, members in FAMILIES.items() if method in members)


def labelled(results: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """The evaluation results of `methods`, in that order, under the paper's names."""
    return [{**r, "method": NAMES[m]} for m in methods for r in results if r["method"] == m]
