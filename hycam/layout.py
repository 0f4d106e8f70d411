"""Where HyCAM goes in a model, and the models it refuses before changing anything.

HyCAM needs (paper Section 3): decoder layers laid out `input_layernorm -> self_attn -> residual add ->
post_attention_layernorm -> mlp -> residual add`, so that the output of `self_attn` is the paper's h_att,
and a final norm after the last layer that every output of the model is computed from (the balance
loss's gradient is attached to its input, `hycam.balance`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
NORMED_ATTENTION_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
"""Parts of layers (Gemma 2 and 3) whose post_attention_layernorm normalises h_att before the residual add."""


@dataclass
class Layout:
    """The parts of a model HyCAM hooks into."""

    backbone: nn.Module
    """The module whose `layers` are the decoder layers (e.g. `LlamaModel`)."""
    layers: nn.ModuleList
    """The decoder layers, in order."""
    norm: nn.Module
    """The backbone's final norm, after the last decoder layer."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, found by their layout (norm -> self_attn -> add -> norm -> mlp -> add)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            all(getattr(layer, part, None) is not None for part in LAYER_PARTS) for layer in module
        ):
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of decoder layers with {', '.join(LAYER_PARTS)}: HyCAM supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} and decoders laid out like them"
    )


def find_layout(model: nn.Module) -> Layout:
    """The backbone, its layers and final norm; a ValueError naming the class and the missing part else."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    sub = [key for key in ("text_config", "vision_config") if hasattr(config, key)]
    if sub or getattr(config, "hidden_size", None) is None:
        what = "a model without config.hidden_size"
        if sub:
            what = f"a multimodal model (its config has {' and '.join(sub)})"
        raise ValueError(f"{name} is {what}: HyCAM supports text decoders such as "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}; apply it to a causal LM or its bare backbone")
    if getattr(config, "use_parallel_residual", False):
        raise ValueError(f"{name} runs attention and MLP in parallel (config.use_parallel_residual): the "
                         "paper's h_att -> residual add -> MLP order does not exist there, HyCAM refuses it")
    layers = decoder_layers(model)
    normed = [part for part in NORMED_ATTENTION_PARTS if hasattr(layers[0], part)]
    if normed:
        raise ValueError(f"{name}: {type(layers[0]).__name__} normalises the attention output before the residual "
                         f"add (it has {', '.join(normed)}, as Gemma 2/3 do), so HyCAM would modulate something "
                         "other than the paper's h_att; HyCAM refuses it")
    backbone = next((m for m in model.modules() if getattr(m, "layers", None) is layers), None)
    norm = getattr(backbone, "norm", None)
    if not isinstance(norm, nn.Module):
        owner = "its decoder layers' owner" if backbone is None else f"its backbone {type(backbone).__name__}"
        raise ValueError(f"{name}: {owner} has no `layers` and final norm `norm` after them, where HyCAM "
                         "attaches the balance loss")
    return Layout(backbone, layers, norm)
