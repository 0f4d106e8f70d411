"""Put HyCAM into a transformers model, take it out, and name its parameters.

HyCAM touches a decoder layer in one place: a forward hook on `self_attn` reads the attention's
input (h_norm) and rewrites `output[0]` (h_att). No transformers `forward` body is copied and the
backbone's parameter names do not change. HyCAM's modules hang on each `self_attn` as
`hycam_modules[adapter_name]` (peft's convention: the tuner's prefix `hycam_` and the adapter name in
every parameter name, e.g. `model.layers.0.self_attn.hycam_modules.default.W_in`). Hooks on the backbone,
its final norm and the model (`hycam.balance`) gather what every router produced and attach the balance loss.
"""

from __future__ import annotations

import torch
from torch import nn

from hycam import balance
from hycam.cam import HyCAM
from hycam.config import HyCAMConfig
from hycam.fast import release_workspace
from hycam.layout import SUPPORTED_MODEL_TYPES, decoder_layers, find_layout

__all__ = ["SUPPORTED_MODEL_TYPES", "apply", "decoder_layers", "hycam_parameters", "is_applied", "remove",
           "trainable_parameters"]

MODULES = "hycam_modules"
"""The `self_attn` attribute that holds HyCAM's modules, by adapter name."""
DEFAULT_ADAPTER = "default"


def apply(model: nn.Module, config: HyCAMConfig | None = None, *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Adds HyCAM to `model` in place, freezes the backbone, and returns the model.

    `model` is a causal LM, a bare backbone (`LlamaModel`, ...) or another head on one; a model HyCAM
    cannot serve is refused before anything changes, with the class and the missing part named.
    peft adapters already in the model (e.g. LoRA) stay trainable. On failure the model is left
    exactly as it was. `adapter_name` names HyCAM's modules (peft's tuner passes its own).
    """
    config = config or HyCAMConfig()
    if not isinstance(config, HyCAMConfig):
        raise TypeError(f"hycam.apply needs a hycam.HyCAMConfig, got {type(config).__name__}")
    if is_applied(model):
        raise ValueError("this model already has HyCAM; call hycam.remove(model) first")
    layout = find_layout(model)
    indices = _layer_indices(config, len(layout.layers))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        _put_in(model, config, layout, indices, adapter_name)
    except BaseException:
        _take_out(model, layout)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        raise
    return model


def _put_in(model: nn.Module, config: HyCAMConfig, layout, indices: list[int], adapter_name: str) -> None:
    hidden = model.config.hidden_size  # not a weight shape: under ZeRO-3 weights are empty here
    model._hycam_trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    adapters = _peft_adapter_parameters(model)
    for param in model.parameters():
        param.requires_grad_(param.requires_grad and id(param) in adapters)
    record = balance.ForwardRecord(config)
    for i in indices:
        _inject_layer(layout.layers[i], hidden, config, adapter_name, record)
    model.hycam_config = config
    balance.install(model, layout.backbone, layout.norm, record)
    mark_trainable(model)


def remove(model: nn.Module) -> nn.Module:
    """Takes HyCAM out again: the backbone computes exactly what it did before `apply`."""
    if not is_applied(model):
        raise ValueError("this model has no HyCAM to remove")
    trainable = set(model._hycam_trainable_before)
    _take_out(model, find_layout(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    release_workspace()
    return model


def _take_out(model: nn.Module, layout) -> None:
    """Undoes whatever part of `_put_in` happened: all of it (`remove`) or some (a failed `apply`)."""
    for layer in layout.layers:
        if hasattr(layer.self_attn, MODULES):
            drop_hooks(layer.self_attn, _after_attention)
            drop_hooks(layer, _before_layer, pre=True)
            delattr(layer.self_attn, MODULES)
            vars(layer.self_attn).pop("hycam_record", None)
    for module, hook, before in balance.hook_sites(model, layout.backbone, layout.norm):
        drop_hooks(module, hook, before)
        vars(module).pop("hycam_record", None)  # absent after a failed apply
    for name in ("hycam_config", "_hycam_trainable_before"):
        vars(model).pop(name, None)


def checkpoint_name(name: str) -> str:
    """`name` as files hold it: peft's rule, the adapter name taken out (`...hycam_modules.default.W_in` ->
    `...hycam_modules.W_in`), so that a file loads under any adapter name."""
    head, sep, tail = name.partition(f".{MODULES}.")
    return head + sep + tail.partition(".")[2] if sep else name


def drop_hooks(module: nn.Module, hook, pre: bool = False) -> None:
    """Removes `hook` from `module` through torch's hook dicts: handles are not kept, since a deep-copied
    model would share them with the original."""
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    with_kwargs = module._forward_pre_hooks_with_kwargs if pre else module._forward_hooks_with_kwargs
    for hook_id in [i for i, fn in hooks.items() if fn is hook]:
        del hooks[hook_id]
        with_kwargs.pop(hook_id, None)


def _peft_adapter_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters of peft adapter layers (LoRA's lora_A, lora_B, ...): not backbone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in (*module.adapter_layer_names, *module.other_param_names):
                part = getattr(module, attr, None)
                if isinstance(part, nn.Module):
                    found |= {id(p) for p in part.parameters()}
    return found


def is_applied(model: nn.Module) -> bool:
    return getattr(model, "hycam_config", None) is not None


def hycam_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter HyCAM owns, by name: its modules' and, with `train_layernorms`, the two norms of each
    layer it modulates. Exactly what `hycam.save` writes."""
    if not is_applied(model):
        raise ValueError("this model has no HyCAM: call hycam.apply(model, config) first")
    norms = set()
    if model.hycam_config.train_layernorms:
        for layer in decoder_layers(model):
            if hasattr(layer.self_attn, MODULES):
                norms |= {id(layer.input_layernorm), id(layer.post_attention_layernorm)}
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, HyCAM) or id(module) in norms:
            found.update(module.named_parameters(prefix=prefix))
    return found


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """HyCAM's parameters that train (`requires_grad`), by name; the backbone's are not among them."""
    return {name: p for name, p in hycam_parameters(model).items() if p.requires_grad}


def mark_trainable(model: nn.Module, requires_grad: bool = True) -> None:
    """Sets `requires_grad` of HyCAM's parameters by its config: all of them, but the routers when
    `train_router=False`; `requires_grad=False` freezes them all (inference)."""
    frozen = set()
    if not model.hycam_config.train_router:
        frozen = {id(p) for cam in model.modules() if isinstance(cam, HyCAM) for p in cam.router_parameters()}
    for param in hycam_parameters(model).values():
        param.requires_grad_(requires_grad and id(param) not in frozen)


def _layer_indices(config: HyCAMConfig, num_layers: int) -> list[int]:
    indices = list(range(num_layers)) if config.layers is None else list(config.layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"HyCAMConfig.layers={config.layers} must name distinct layers in 0..{num_layers - 1}")
    return indices


def _inject_layer(layer: nn.Module, hidden: int, config: HyCAMConfig, adapter_name: str,
                  record: balance.ForwardRecord) -> None:
    # a floating weight (a norm's): quantized bases pack their linear weights into integers
    weight = next(p for p in layer.parameters() if p.is_floating_point())
    cam = HyCAM(hidden, config, device=weight.device, dtype=weight.dtype).train(layer.training)
    setattr(layer.self_attn, MODULES, nn.ModuleDict({adapter_name: cam}))
    layer.self_attn.hycam_record = record
    layer.self_attn.register_forward_hook(_after_attention, with_kwargs=True)
    if config.modulate == "residual":
        layer.register_forward_pre_hook(_before_layer, with_kwargs=True)


def _before_layer(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """modulate="residual": the layer's input, which the attention hook adds to h_att."""
    layer.self_attn.hycam_record.residual = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _after_attention(attn: nn.Module, args: tuple, kwargs: dict, output):
    """h_out = h_att + h_att * A_fusion (paper), or h_att + (residual + h_att) * A_fusion, which
    makes the layer's residual sum (residual + h_att) * (1 + A_fusion) as the authors' code does."""
    h_norm = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, d)
    h_att = output[0] if isinstance(output, tuple) else output  # (B, L, d)
    (cam,) = attn.hycam_modules.values()  # one adapter a model
    record: balance.ForwardRecord = attn.hycam_record
    A_fusion, logits, probs = cam(h_norm)  # (B, L, d), (B, L, N_s) or None
    record.add(logits, probs)
    base = h_att
    if record.residual is not None:
        base, record.residual = record.residual + h_att, None
    h_out = torch.addcmul(h_att, base, A_fusion)  # one pass instead of a multiply and an add
    return (h_out, *output[1:]) if isinstance(output, tuple) else h_out
