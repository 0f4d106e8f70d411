"""Put HyCAM into a transformers model, take it out, and name its parameters.

HyCAM touches a decoder layer in one place: a forward hook on `self_attn` reads the attention's
input (h_norm) and rewrites `output[0]` (h_att). No transformers `forward` body is copied and the
backbone's parameter names do not change. HyCAM's modules hang on each `self_attn` as
`hycam_modules[adapter_name]` (peft's convention: the tuner's prefix `hycam_` and the adapter name in
every parameter name, e.g. `model.layers.0.self_attn.hycam_modules.default.W_in`). Hooks on the backbone,
its final norm and the model (`hycam.balance`) gather what every router produced and attach the balance loss.
`apply` puts in one adapter, peft's tuner more (`add_adapter`); the active one (`activate`) is what the hook
applies, `model.hycam_config` and the balance loss are its own; `set_enabled(model, False)`: none applies.
"""

from __future__ import annotations

import torch
from torch import nn

from hycam import balance
from hycam.cam import HyCAM
from hycam.config import HyCAMConfig
from hycam.fast import release_workspace
from hycam.layout import SUPPORTED_MODEL_TYPES, decoder_layers, find_layout
from hycam.tuner_layer import HyCAMLayer, hycam_layers, mark

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
    config = _checked(config or HyCAMConfig())
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


def _checked(config) -> HyCAMConfig:
    if not isinstance(config, HyCAMConfig):
        raise TypeError(f"hycam.apply needs a hycam.HyCAMConfig, got {type(config).__name__}")
    return config


def _put_in(model: nn.Module, config: HyCAMConfig, layout, indices: list[int], adapter_name: str) -> None:
    model._hycam_trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    adapters = _peft_adapter_parameters(model)
    for param in model.parameters():
        param.requires_grad_(param.requires_grad and id(param) in adapters)
    record = balance.ForwardRecord(config)
    model.hycam_adapters = {adapter_name: config}
    for i in indices:
        _inject_layer(model, layout.layers[i], config, adapter_name, record)
    balance.install(model, layout.backbone, layout.norm, record)
    activate(model, adapter_name)
    mark_trainable(model)


def add_adapter(model: nn.Module, config: HyCAMConfig, adapter_name: str) -> None:
    """A further HyCAM adapter, with its own modules and router, on a model that has HyCAM. It is not active
    (`activate`) and does not train (`mark_trainable`) until chosen. On failure the model is left as it was."""
    config = _checked(config)
    if adapter_name in model.hycam_adapters:
        raise ValueError(f"this model already has a HyCAM adapter named {adapter_name!r}")
    if config.train_layernorms or model.hycam_config.train_layernorms:
        raise ValueError("HyCAMConfig(train_layernorms=True) trains the backbone's norms, which every adapter "
                         "of a model shares: such an adapter must be the model's only one")
    layout = find_layout(model)
    indices = _layer_indices(config, len(layout.layers))
    model.hycam_adapters[adapter_name] = config
    try:
        for i in indices:
            _inject_layer(model, layout.layers[i], config, adapter_name, model.hycam_record)
            mark(getattr(layout.layers[i].self_attn, MODULES)[adapter_name], False)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Takes one adapter's modules out; the first adapter left becomes active, and without any left the model
    is the backbone again (`remove`)."""
    remaining = [name for name in model.hycam_adapters if name != adapter_name]
    if not remaining:
        remove(model)
        return
    for layer in decoder_layers(model):
        cams = getattr(layer.self_attn, MODULES, None)
        if cams is not None and adapter_name in cams:
            cams.delete_adapter(adapter_name)
            _sync_hooks(model, layer)
    del model.hycam_adapters[adapter_name]
    if adapter_name == model.hycam_active:
        activate(model, remaining[0])


def activate(model: nn.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the adapter every forward applies, routes and computes the balance loss of."""
    model.hycam_config = model.hycam_record.config = model.hycam_adapters[adapter_name]
    model.hycam_active = adapter_name
    for cams in hycam_layers(model):
        cams.set_adapter(adapter_name)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switches HyCAM off (the backbone's outputs exactly) or back on, keeping every weight."""
    for cams in hycam_layers(model):
        cams.enable_adapters(enabled)


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
            _strip(layer)
    for module, hook, before in balance.hook_sites(model, layout.backbone, layout.norm):
        drop_hooks(module, hook, before)
        vars(module).pop("hycam_record", None)  # absent after a failed apply
    for name in ("hycam_config", "hycam_adapters", "hycam_active", "_hycam_trainable_before"):
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


def hycam_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Every parameter of one HyCAM adapter (the active one by default), by name: its modules' and, with
    `train_layernorms`, the two norms of each layer it modulates. Exactly what `hycam.save` writes."""
    if not is_applied(model):
        raise ValueError("this model has no HyCAM: call hycam.apply(model, config) first")
    name = model.hycam_active if adapter_name is None else adapter_name
    if name not in model.hycam_adapters:
        raise ValueError(f"this model has no HyCAM adapter {name!r}, only {sorted(model.hycam_adapters)}")
    norms = set()
    if model.hycam_adapters[name].train_layernorms:
        for layer in decoder_layers(model):
            if hasattr(layer.self_attn, MODULES):
                norms |= {id(layer.input_layernorm), id(layer.post_attention_layernorm)}
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, HyCAMLayer) and name in module:
            found.update(module[name].named_parameters(prefix=f"{prefix}.{name}"))
        elif id(module) in norms:
            found.update(module.named_parameters(prefix=prefix))
    return found


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """HyCAM's parameters that train (`requires_grad`), by name; the backbone's are not among them."""
    return {name: p for name, p in hycam_parameters(model).items() if p.requires_grad}


def mark_trainable(model: nn.Module, requires_grad: bool = True) -> None:
    """Sets `requires_grad` of HyCAM's parameters: the active adapter's by its config (all of them, but its
    routers when `train_router=False`; the norms too with `train_layernorms`), every other adapter's frozen;
    `requires_grad=False` freezes them all (inference)."""
    active = model.hycam_active
    for cams in hycam_layers(model):
        for name, cam in cams.items():
            mark(cam, requires_grad and name == active)
    for name, param in hycam_parameters(model).items():
        if f".{MODULES}." not in name:  # a norm (train_layernorms)
            param.requires_grad_(requires_grad)


def _layer_indices(config: HyCAMConfig, num_layers: int) -> list[int]:
    indices = list(range(num_layers)) if config.layers is None else list(config.layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"HyCAMConfig.layers={config.layers} must name distinct layers in 0..{num_layers - 1}")
    return indices


def _inject_layer(model: nn.Module, layer: nn.Module, config: HyCAMConfig, adapter_name: str,
                  record: balance.ForwardRecord) -> None:
    hidden = model.config.hidden_size  # not a weight shape: under ZeRO-3 weights are empty here
    # a floating weight (a norm's): quantized bases pack their linear weights into integers
    weight = next(p for p in layer.parameters() if p.is_floating_point())
    cam = HyCAM(hidden, config, device=weight.device, dtype=weight.dtype).train(layer.training)
    cams = getattr(layer.self_attn, MODULES, None)
    if cams is None:
        cams = HyCAMLayer()
        cams.set_adapter(model.hycam_active if is_applied(model) else adapter_name)
        setattr(layer.self_attn, MODULES, cams)
        layer.self_attn.hycam_record = record
    cams[adapter_name] = cam
    _sync_hooks(model, layer)


def _sync_hooks(model: nn.Module, layer: nn.Module) -> None:
    """The layer's hooks for the adapters it holds: the attention hook, and the layer's pre-hook when one of
    them modulates the residual sum (it costs a call per layer and token otherwise); none without adapters."""
    cams = getattr(layer.self_attn, MODULES)
    if not cams:
        _strip(layer)
        return
    if not _has_hook(layer.self_attn, _after_attention):
        layer.self_attn.register_forward_hook(_after_attention, with_kwargs=True)
    residual = any(model.hycam_adapters[name].modulate == "residual" for name in cams)
    if residual and not _has_hook(layer, _before_layer, pre=True):
        layer.register_forward_pre_hook(_before_layer, with_kwargs=True)
    elif not residual:
        drop_hooks(layer, _before_layer, pre=True)


def _strip(layer: nn.Module) -> None:
    drop_hooks(layer.self_attn, _after_attention)
    drop_hooks(layer, _before_layer, pre=True)
    delattr(layer.self_attn, MODULES)
    vars(layer.self_attn).pop("hycam_record", None)


def _has_hook(module: nn.Module, hook, pre: bool = False) -> bool:
    return any(fn is hook for fn in (module._forward_pre_hooks if pre else module._forward_hooks).values())


def _before_layer(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """modulate="residual": the layer's input, which the attention hook adds to h_att."""
    record: balance.ForwardRecord = layer.self_attn.hycam_record
    if record.config.modulate == "residual":  # the active adapter's choice; another adapter may differ
        record.residual = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _after_attention(attn: nn.Module, args: tuple, kwargs: dict, output):
    """h_out = h_att + h_att * A_fusion (paper), or h_att + (residual + h_att) * A_fusion, which
    makes the layer's residual sum (residual + h_att) * (1 + A_fusion) as the authors' code does."""
    record: balance.ForwardRecord = attn.hycam_record
    residual, record.residual = record.residual, None
    cam = attn.hycam_modules.active_module()
    if cam is None:  # disabled (peft's disable_adapter), or the active adapter leaves this layer alone
        return output
    h_norm = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, d)
    h_att = output[0] if isinstance(output, tuple) else output  # (B, L, d)
    A_fusion, logits, probs = cam(h_norm)  # (B, L, d), (B, L, N_s) or None
    record.add(logits, probs)
    base = h_att if residual is None else residual + h_att
    h_out = torch.addcmul(h_att, base, A_fusion)  # one pass instead of a multiply and an add
    return (h_out, *output[1:]) if isinstance(output, tuple) else h_out
