"""Put HyCAM into a transformers causal LM, take it out, and name its parameters.

HyCAM touches a decoder layer in one place: a forward hook on `self_attn` reads the attention's
input (h_norm) and rewrites `output[0]` (h_att). No transformers `forward` body is copied and the
backbone's parameter names do not change. One patch on the model's own `forward`
(`hycam.outputs`) stacks what every router produced and adds the balance loss.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from hycam.cam import HyCAM, Router
from hycam.config import HyCAMConfig
from hycam.fusion import release_workspace
from hycam.outputs import routed_forward_for

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, found by their layout (norm -> self_attn -> add -> norm -> mlp -> add)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            all(hasattr(layer, part) for part in LAYER_PARTS) for layer in module
        ):
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of decoder layers with {', '.join(LAYER_PARTS)}: HyCAM supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} and decoders laid out like them"
    )


def apply(model: nn.Module, config: HyCAMConfig | None = None) -> nn.Module:
    """Adds HyCAM to `model` in place, freezes the backbone, and returns the model. peft adapters
    already in the model (e.g. LoRA) stay trainable. On failure the model is left exactly as it was."""
    config = config or HyCAMConfig()
    if not isinstance(config, HyCAMConfig):
        raise TypeError(f"hycam.apply needs a hycam.HyCAMConfig, got {type(config).__name__}")
    if is_applied(model):
        raise ValueError("this model already has HyCAM; call hycam.remove(model) first")
    if "forward" in vars(model):
        raise ValueError(f"{type(model).__name__}.forward is already patched on this instance; HyCAM patches it too")
    layers = decoder_layers(model)
    indices = _layer_indices(config, len(layers))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        _put_in(model, config, [layers[i] for i in indices])
    except BaseException:
        _take_out(model)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        raise
    return model


def _put_in(model: nn.Module, config: HyCAMConfig, layers: list[nn.Module]) -> None:
    hidden = model.config.hidden_size  # not a weight shape: under ZeRO-3 weights are empty here
    model._hycam_trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    adapters = _peft_adapter_parameters(model)
    for param in model.parameters():
        param.requires_grad_(param.requires_grad and id(param) in adapters)
    for layer in layers:
        _inject_layer(layer, hidden, config)
    model.hycam_config = config
    model.forward = types.MethodType(routed_forward_for(type(model)), model)
    for param in trainable_parameters(model).values():
        param.requires_grad_(True)


def remove(model: nn.Module) -> nn.Module:
    """Takes HyCAM out again: the backbone computes exactly what it did before `apply`."""
    if not is_applied(model):
        raise ValueError("this model has no HyCAM to remove")
    trainable = set(model._hycam_trainable_before)
    _take_out(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    release_workspace()
    return model


def _take_out(model: nn.Module) -> None:
    """Undoes whatever part of `_put_in` happened: all of it (`remove`) or some (a failed `apply`)."""
    for layer in decoder_layers(model):
        if hasattr(layer.self_attn, "hycam"):
            _drop_hooks(layer.self_attn, _modulate)
            _drop_hooks(layer, _stash_residual, pre=True)
            del layer.self_attn.hycam
    for name in ("forward", "hycam_config", "_hycam_trainable_before"):
        vars(model).pop(name, None)


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
    """Every parameter HyCAM adds or trains, by name: exactly what `hycam.save` writes."""
    return _collect(model, include_frozen_router=True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters HyCAM trains, by name; the backbone's are not among them."""
    return _collect(model, include_frozen_router=False)


def _collect(model: nn.Module, include_frozen_router: bool) -> dict[str, nn.Parameter]:
    if not is_applied(model):
        raise ValueError("this model has no HyCAM: call hycam.apply(model, config) first")
    config: HyCAMConfig = model.hycam_config
    skip_router = not (config.train_router or include_frozen_router)
    norms = set()
    if config.train_layernorms:
        for layer in decoder_layers(model):
            if hasattr(layer.self_attn, "hycam"):
                norms |= {id(layer.input_layernorm), id(layer.post_attention_layernorm)}
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, HyCAM) or id(module) in norms:
            for name, child in module.named_modules(prefix=prefix):
                if not (skip_router and isinstance(child, Router)):
                    found.update(child.named_parameters(prefix=name, recurse=False))
    return found


def _layer_indices(config: HyCAMConfig, num_layers: int) -> list[int]:
    indices = list(range(num_layers)) if config.layers is None else list(config.layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"HyCAMConfig.layers={config.layers} must name distinct layers in 0..{num_layers - 1}")
    return indices


def _inject_layer(layer: nn.Module, hidden: int, config: HyCAMConfig) -> None:
    weight = next(layer.parameters())
    cam = HyCAM(hidden, config, device=weight.device, dtype=weight.dtype).train(layer.training)
    cam.residual = None
    layer.self_attn.hycam = cam
    layer.self_attn.register_forward_hook(_modulate, with_kwargs=True)
    if config.modulate == "residual":
        layer.register_forward_pre_hook(_stash_residual, with_kwargs=True)


def _modulate(attn: nn.Module, args: tuple, kwargs: dict, output):
    """h_out = h_att + h_att * A_fusion (paper), or h_att + (residual + h_att) * A_fusion, which
    makes the layer's residual sum (residual + h_att) * (1 + A_fusion) as the authors' code does."""
    h_norm = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, d)
    h_att = output[0] if isinstance(output, tuple) else output  # (B, L, d)
    cam: HyCAM = attn.hycam
    base = h_att if cam.residual is None else cam.residual + h_att
    cam.residual = None
    h_out = torch.addcmul(h_att, base, cam(h_norm))  # one pass instead of a multiply and an add
    return (h_out, *output[1:]) if isinstance(output, tuple) else h_out


def _stash_residual(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    layer.self_attn.hycam.residual = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _drop_hooks(module: nn.Module, hook, pre: bool = False) -> None:
    # Handles are not kept: a deep-copied model would share them with the original.
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    with_kwargs = module._forward_pre_hooks_with_kwargs if pre else module._forward_hooks_with_kwargs
    for hook_id in [i for i, fn in hooks.items() if fn is hook]:
        del hooks[hook_id]
        with_kwargs.pop(hook_id, None)
