"""HyCAM as a peft method, registered when `hycam` is imported.

`peft.get_peft_model(model, hycam.HyCAMConfig(...))`, `PeftModel.from_pretrained`, transformers'
`model.load_adapter`, `Trainer`, TRL and lm-evaluation-harness then handle HyCAM through peft's own
files (`adapter_config.json`, `adapter_model.safetensors`). The tuner builds on HyCAM's public API
only: `hycam.apply` puts HyCAM in, `hycam.remove` takes it out, `hycam_parameters` names what is
saved, so the tensors in peft's file are exactly `hycam.save`'s, under peft's `base_model.model.`
prefix and, by peft's rule, without the adapter name (`...self_attn.hycam_modules.W_in`; HyCAM holds one
adapter a model). Adapters of hycam 0.1.0 load too (`hycam.legacy`).

The key mapping goes through the state-dict hooks that peft 0.21 gave its tuners
(`BaseTuner._get_adapter_state_dict`, `_remap_adapter_state_dict_for_load`). peft 0.15-0.20 have
`register_peft_method` but pick a method's tensors by the substring `prefix` and insert the adapter
name after it on loading: their `save_pretrained` writes an adapter file without a single HyCAM
tensor (seen on 0.20.0). On those, the tuner refuses to start.
"""

from __future__ import annotations

import peft
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import register_peft_method
from torch import nn

from hycam import legacy
from hycam.config import HyCAMConfig
from hycam.files import PEFT_KEY_PREFIX
from hycam.inject import MODULES, apply, checkpoint_name, hycam_parameters, is_applied, mark_trainable, remove
from hycam.peft_type import HYCAM

PREFIX = "hycam_"  # peft's rule is name + "_": HyCAM's modules hang on `self_attn` as `hycam_modules`


class HyCAMModel(BaseTuner):
    """peft's tuner of HyCAM: one adapter, injected by `hycam.apply`, not mergeable (SiLU is nonlinear)."""

    prefix = PREFIX
    target_module_mapping: dict[str, list[str]] = {}  # peft tuners declare it; HyCAM finds its layers by layout

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
            raise RuntimeError(f"HyCAM as a peft method needs peft>=0.21.0, this is {peft.__version__}: older "
                               "versions write adapter files without HyCAM's tensors (see hycam.peft_tuner)")
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config: HyCAMConfig = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        if config.train_layernorms:
            raise ValueError("HyCAMConfig(train_layernorms=True) trains backbone norms, which peft's adapter file "
                             "does not hold: use hycam.apply / hycam.save for it")
        apply(model, config, adapter_name=adapter_name)
        if config.inference_mode:
            mark_trainable(model, requires_grad=False)
        modulated = (name for name, module in model.named_modules() if MODULES in module._modules)
        self.targeted_module_names = sorted(modulated)

    def _check_new_adapter_config(self, config: HyCAMConfig) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(f"a model holds one HyCAM adapter, and this one has {sorted(self.peft_config)}")

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("HyCAM is put in whole by hycam.apply, not module by module")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        mark_trainable(model)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        mark_trainable(self.model, requires_grad)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        if adapter_name not in (self.active_adapter, [self.active_adapter]):
            raise ValueError(f"this model's HyCAM adapter is {self.active_adapter!r}, not {adapter_name!r}")
        self.set_requires_grad(adapter_name, requires_grad=not inference_mode)

    def enable_adapter_layers(self) -> None:
        """HyCAM is always on while it is in the model."""

    def disable_adapter_layers(self) -> None:
        raise NotImplementedError("HyCAM cannot be switched off in place: hycam.remove(model) takes it out "
                                  "(hycam.save it first to put it back with hycam.load)")

    def delete_adapter(self, adapter_name: str) -> None:
        self.set_adapter(adapter_name)
        remove(self.model)
        del self.peft_config[adapter_name]

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError("HyCAM cannot be merged into the weights: h_att * SiLU(h_norm W) is not linear in h_norm")

    def unload(self) -> nn.Module:
        """The backbone without HyCAM, exactly as before `get_peft_model`."""
        return remove(self.model)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        names = _hycam_names(model)
        return {key: value for key, value in state_dict.items() if key.removeprefix(PEFT_KEY_PREFIX) in names}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return checkpoint_name(key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The file's tensors under this model's names (hycam 0.1.0's upgraded), checked first to be exactly
        this model's HyCAM tensors (peft itself would skip missing ones)."""
        by_checkpoint_name = {checkpoint_name(name): name for name in _hycam_names(model)}
        tensors = legacy.upgrade({key.removeprefix(PEFT_KEY_PREFIX): value for key, value in state_dict.items()},
                                 config.train_router)
        missing = sorted(by_checkpoint_name.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - by_checkpoint_name.keys())
        if missing or unexpected:
            raise ValueError(f"the HyCAM adapter does not match this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        wrapped = any(name.startswith(PEFT_KEY_PREFIX) for name, _ in model.named_parameters())
        prefix = PEFT_KEY_PREFIX if wrapped else ""
        return {prefix + by_checkpoint_name[key]: value for key, value in tensors.items()}


def _hycam_names(model: nn.Module) -> set[str]:
    """The names of HyCAM's tensors as the base model calls them (peft's prefix taken off)."""
    if not is_applied(model):  # a PeftModel passes attribute reads on to the model it wraps
        raise ValueError(f"{type(model).__name__} holds no HyCAM")
    return {name.removeprefix(PEFT_KEY_PREFIX) for name in hycam_parameters(model)}


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if HYCAM not in PEFT_TYPE_TO_TUNER_MAPPING:  # importlib.reload(hycam) must not register twice
        register_peft_method(name="hycam", config_cls=HyCAMConfig, model_cls=HyCAMModel, prefix=PREFIX)


register()
