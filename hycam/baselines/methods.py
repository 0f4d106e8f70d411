"""Every method of the paper's tables behind one interface: prepare, name what trains, save, load.

Methods: HyCAM and its variants (`HyCAMConfig.variant` names), `lora` (peft, all linear layers),
`multilora`, `riemoe` (hycam.baselines.multilora, hycam.baselines.riemoe) and `full` fine-tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import hycam
from hycam.checkpoint import (base_model_signature, copy_verified, gather_tensors, hycam_meta, read_config, read_json,
                              write_checkpoint)
from hycam.config import VARIANTS, HyCAMConfig
# The names this module has always used, from the one place that names files.
from hycam.files import FULL_WEIGHTS as WEIGHTS_FILE
from hycam.files import HYCAM_CONFIG as CONFIG_NAME
from hycam.files import HYCAM_WEIGHTS as WEIGHTS_NAME
from hycam.files import METHOD as METHOD_FILE

BASELINES = ("lora", "multilora", "riemoe", "full")
METHODS = VARIANTS + BASELINES


@dataclass
class MethodOptions:
    """The knobs the methods share; each method reads the ones it has."""

    rank: int = 64
    """HyCAM's specialized-CAM rank and LoRA's rank (paper: 64)."""
    num_specialized: int = 5
    """HyCAM's N_s; also the number of adapters (Multi-LoRA) and experts (RieMoE-LoRA)."""
    expert_rank: int | None = None
    """Rank of each Multi-LoRA adapter / RieMoE expert; None: `rank`, as the paper sets every LoRA's."""
    lora_alpha: float = 32.0
    """LoRA-family scaling numerator (scale = alpha / rank); 32 is the authors' value."""
    tau: float = 0.5
    """Gumbel-softmax temperature (HyCAM)."""
    balance_coef: float = 0.1
    """lambda_balance (HyCAM)."""
    balance_scope: str = "local"
    """'local' or 'global': the balance loss's means over this rank's tokens or all ranks' (HyCAM)."""

    def expert_rank_or_default(self) -> int:
        return self.expert_rank or self.rank


def prepare(model: nn.Module, method: str, options: MethodOptions) -> nn.Module:
    """Adds `method` to `model` (in place where possible) and returns the model to train."""
    if method in VARIANTS:
        return hycam.apply(model, hycam_config(method, options))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=options.rank, lora_alpha=options.lora_alpha, target_modules="all-linear",
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    if method in ("multilora", "riemoe"):
        from hycam.baselines.multilora import apply_multilora
        from hycam.baselines.riemoe import apply_riemoe, register_riemannian_hooks

        settings = dict(rank=options.expert_rank_or_default(), alpha=options.lora_alpha)
        if method == "multilora":
            return apply_multilora(model, num_adapters=options.num_specialized, **settings)
        apply_riemoe(model, num_experts=options.num_specialized, **settings)
        register_riemannian_hooks(model)
        return model
    if method == "full":
        return model.requires_grad_(True)
    raise ValueError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


def hycam_config(method: str, options: MethodOptions) -> HyCAMConfig:
    """The HyCAM configuration of the variant `method` under `options`."""
    overrides = {"tau": options.tau, "balance_coef": options.balance_coef, "balance_scope": options.balance_scope}
    if method != "shared_only":
        overrides["num_specialized"] = options.num_specialized
    if method not in ("full_spec", "inverse_peft"):
        overrides["rank"] = options.rank
    if method == "inverse_peft":
        overrides["shared_rank"] = options.rank
    return HyCAMConfig.variant(method, **overrides)


def trainable(model: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """The parameters `method` trains, by name."""
    if method in VARIANTS:
        return hycam.trainable_parameters(model)
    if method in ("multilora", "riemoe"):
        from hycam.baselines.adapters import adapter_parameters

        return adapter_parameters(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def saved(model: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """What a checkpoint of `method` holds: the trained weights only (all of them for `full`)."""
    return hycam.hycam_parameters(model) if method in VARIANTS else trainable(model, method)


def save_trained(model: nn.Module, method: str, options: MethodOptions, path: str | Path, info: dict) -> None:
    """Writes `method.json` and the weights to `path` atomically; HyCAM checkpoints are also
    `hycam.load`-able (ZeRO-3 aware: every rank must call this)."""
    write_checkpoint(path, *trained_files(model, method, options, info))


def trained_files(model: nn.Module, method: str, options: MethodOptions, info: dict) -> tuple[dict, str, dict]:
    """What `save_trained` writes: (tensors, weights file name, {JSON file name: content}); a collective
    under ZeRO-3. The training harness writes them into a staging folder of its own."""
    tensors = gather_tensors(saved(model, method))
    meta = {"method": method, "options": asdict(options), "base_model": base_model_signature(model), **info}
    if method in VARIANTS:
        return tensors, WEIGHTS_NAME, {METHOD_FILE: meta, CONFIG_NAME: hycam_meta(model)}
    return tensors, WEIGHTS_FILE, {METHOD_FILE: meta}


def read_method(path: str | Path) -> dict:
    """The checkpoint's method.json, checked: a ValueError names the file and what is wrong."""
    file = Path(path) / METHOD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a trained checkpoint: {METHOD_FILE} is missing")
    meta = read_json(file)
    method = meta.get("method")
    if method not in METHODS:
        raise ValueError(f"{file}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    missing = sorted({"base_model", "options"} - set(meta))
    if missing:
        raise ValueError(f"{file}: the keys {missing} are missing")
    return meta


def method_options(meta: dict, path: str | Path) -> MethodOptions:
    try:
        return MethodOptions(**meta["options"])
    except TypeError as err:
        raise ValueError(f"{Path(path) / METHOD_FILE}: 'options' does not fit MethodOptions ({err})") from None


def load_into(model: nn.Module, path: str | Path, meta: dict | None = None) -> nn.Module:
    """Prepares `model` for the checkpoint's method and loads its weights; returns the model.
    `meta`: its method.json where the caller has read it already (`read_method`)."""
    meta = read_method(path) if meta is None else meta
    if meta["base_model"] != base_model_signature(model):
        raise ValueError(f"{path} was trained on base model {meta['base_model']}, not on {base_model_signature(model)}")
    options = method_options(meta, path)
    try:
        if meta["method"] in VARIANTS:
            _check_variant(path, meta["method"], options)
            return hycam.load(model, path)
        return _load_baseline(prepare(model, meta["method"], options), meta["method"], Path(path) / WEIGHTS_FILE)
    except SafetensorError as err:
        name = WEIGHTS_NAME if meta["method"] in VARIANTS else WEIGHTS_FILE
        raise ValueError(f"{Path(path) / name}: not a readable safetensors file ({err})") from None


def _check_variant(path: str | Path, method: str, options: MethodOptions) -> None:
    """Refuses a HyCAM checkpoint whose weights' config is not the one its method.json names."""
    expected, saved = hycam_config(method, options), HyCAMConfig.from_dict(read_config(path)["hycam_config"])
    differ = [f"{f.name} {getattr(saved, f.name)!r} (not {getattr(expected, f.name)!r})" for f in fields(HyCAMConfig)
              if f.name != "init_std" and getattr(saved, f.name) != getattr(expected, f.name)]  # init only
    if differ:
        raise ValueError(f"{Path(path) / METHOD_FILE} names {method!r}, but {Path(path) / CONFIG_NAME} holds another "
                         f"HyCAM: {', '.join(differ[:3])}")


def _load_baseline(model: nn.Module, method: str, file: Path) -> nn.Module:
    copy_verified(saved(model, method), load_file(file), file)
    return model
