"""HyCAM's modules of one attention module, by adapter name: peft's tuner layer of HyCAM.

peft finds a method's adapters through its tuner layers (`BaseTunerLayer`): `PeftModel.disable_adapter`,
`get_layer_status`, `get_base_model_state_dict` and `supports_lora_conversion` all visit them. HyCAM's layer
wraps no base layer: the attention module it modulates stays where it was, and the attention hook
(`hycam.inject`) asks this layer which module, if any, to apply (`active_module`).

One adapter is active at a time. Several at once would have to mean summing their A_fusion, which is not
what any one of them was trained to compute (each router routes under its own shared CAM), so it is refused.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class HyCAMLayer(nn.ModuleDict, BaseTunerLayer):
    """The `hycam_modules` of one `self_attn`: a `hycam.cam.HyCAM` per adapter name, which peft's naming puts
    into every parameter name (`...self_attn.hycam_modules.<adapter>.W_in`)."""

    adapter_layer_names = ("adapters",)

    @property
    def adapters(self) -> nn.ModuleDict:
        """peft reads a layer's adapters through the attributes named in `adapter_layer_names`: the layer itself."""
        return self

    def active_module(self) -> nn.Module | None:
        """The active adapter's module; None when adapters are disabled or the active one skips this layer."""
        names = self.active_adapters
        if self._disable_adapters or not names or names[0] not in self:
            return None
        return self[names[0]]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Makes `adapter_names` (one name) the active adapter; `requires_grad` is the tuner's to set
        (`hycam.inject.mark_trainable`), by the adapter's config."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"HyCAM applies one adapter at a time, got {names}")
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        """Switches the layer on or off. `requires_grad` stays: a disabled adapter is not in the forward, so it
        gets no gradient, and a frozen router or an inference-mode adapter stays frozen when switched back on."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Drops the adapter's module; the tuner chooses the next active adapter for all layers alike."""
        if adapter_name in self:
            del self[adapter_name]
        if adapter_name in self.active_adapters:
            self._active_adapter = []

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """Nothing to move: HyCAM's modules are made on the device and dtype of the layer they modulate, and the
        layer has no base weight to take them from (peft's version would read this layer's own `weight`)."""

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, cam in self.items():
            if name in names:
                mark(cam, requires_grad)


def hycam_layers(model: nn.Module) -> list[HyCAMLayer]:
    return [module for module in model.modules() if isinstance(module, HyCAMLayer)]


def mark(cam: nn.Module, requires_grad: bool) -> None:
    """Sets `requires_grad` of one adapter's module: all its parameters but a router that does not train (one
    that has its own `W_router`, `train_router=False`), which stays frozen."""
    frozen = {id(p) for p in cam.router_parameters()} if cam.W_router is not None else set()
    for param in cam.parameters():
        param.requires_grad_(requires_grad and id(param) not in frozen)
