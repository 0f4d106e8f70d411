"""Put HyCAM into a transformers model, take it out, and name its parameters.

HyCAM touches a decoder layer in one place: a forward hook on `self_attn` reads the attention's
input (h_norm) and rewrites `output[0]` (h_att). No transformers `forward` body is copied and the
backbone's parameter names do not change. Hooks on the backbone, its final norm and the model
(`hycam.outputs`) gather what every router produced and attach the balance loss.
"""

from __future__ import annotations

import torch
from torch import nn

from hycam import outputs
from hycam.cam import HyCAM, Router
from hycam.config import HyCAMConfig
from hycam.fusion import release_workspace
from hycam.layout import SUPPORTED_MODEL_TYPES, decoder_layers, find_layout

__all__ = ["SUPPORTED_MODEL_TYPES", "apply", "decoder_layers", "hycam_parameters", "is_applied", "remove",
           "trainable_parameters"]


def apply(model: nn.Module, config: HyCAMConfig | None = None) -> nn.Module:
    """Adds HyCAM to `model` in place, freezes the backbone, and returns the model.

    `model` is a causal LM, a bare backbone (`LlamaModel`, ...) or another head on one; a model HyCAM
    cannot serve is refused before anything changes, with the class and the missing part named.
    peft adapters already in the model (e.g. LoRA) stay trainable. On failure the model is left
    exactly as it was.
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
        _put_in(model, config, layout, indices)
    except BaseException:
        _take_out(model, layout)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        raise
    return model


def _put_in(model: nn.Module, config: HyCAMConfig, layout, indices: list[int]) -> None:
    hidden = model.config.hidden_size  # not a weight shape: under ZeRO-3 weights are empty here
    model._hycam_trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    adapters = _peft_adapter_parameters(model)
    for param in model.parameters():
        param.requires_grad_(param.requires_grad and id(param) in adapters)
    recorder = outputs.RoutingRecorder(config)
    for i in indices:
        _inject_layer(layout.layers[i], hidden, config, recorder)
    model.hycam_config = config
    outputs.install(model, layout.backbone, layout.norm, recorder)
    for param in trainable_parameters(model).values():
        param.requires_grad_(True)


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
        if hasattr(layer.self_attn, "hycam"):
            outputs.drop_hooks(layer.self_attn, _modulate)
            outputs.drop_hooks(layer, _stash_residual, pre=True)
            del layer.self_attn.hycam
    outputs.uninstall(model, layout.backbone, layout.norm)
    for name in ("hycam_config", "_hycam_trainable_before"):
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


def _inject_layer(layer: nn.Module, hidden: int, config: HyCAMConfig, recorder: outputs.RoutingRecorder) -> None:
    weight = next(layer.parameters())
    cam = HyCAM(hidden, config, device=weight.device, dtype=weight.dtype).train(layer.training)
    cam.residual = None
    if cam.router is not None:
        cam.router.recorder = recorder
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
    base = h_att
    if cam.residual is not None:  # only then: a module's __setattr__ is slow, and this runs per layer and token
        base, cam.residual = cam.residual + h_att, None
    h_out = torch.addcmul(h_att, base, cam(h_norm))  # one pass instead of a multiply and an add
    return (h_out, *output[1:]) if isinstance(output, tuple) else h_out


def _stash_residual(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    layer.self_attn.hycam.residual = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
