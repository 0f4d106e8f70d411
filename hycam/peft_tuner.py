"""HyCAM as a peft method, registered when `hycam` is imported.

`peft.get_peft_model(model, hycam.HyCAMConfig(...))`, `PeftModel.from_pretrained`, transformers'
`model.load_adapter`, `Trainer`, TRL and lm-evaluation-harness then handle HyCAM through peft's own
files (`adapter_config.json`, `adapter_model.safetensors`). The tuner builds on `hycam.inject`: `hycam.apply`
puts the first adapter in, `add_adapter` the next ones (`PeftModel.add_adapter`, `load_adapter`), `activate`
chooses the one adapter that runs (`set_adapter`), `hycam.remove` takes HyCAM out, and `hycam_parameters`
names what is saved, so the tensors in peft's file are exactly `hycam.save`'s for that adapter, under peft's
`base_model.model.` prefix and, by peft's rule, without the adapter name (`...self_attn.hycam_modules.W_in`).
Each attention module's adapters are a peft tuner layer (`hycam.tuner_layer.HyCAMLayer`), so peft's
`disable_adapter`, layer status and `get_base_model_state_dict` see them. Adapters of hycam 0.1.0 load too
(`hycam.legacy`).

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
from hycam.checkpoint import whole
from hycam.config import HyCAMConfig
from hycam.files import PEFT_KEY_PREFIX
from hycam.inject import (activate, add_adapter, apply, checkpoint_name, delete_adapter, hycam_parameters, is_applied,
                          mark_trainable, remove, set_enabled)
from hycam.peft_type import HYCAM
from hycam.tuner_layer import HyCAMLayer, hycam_layers

PREFIX = "hycam_"  # peft's rule is name + "_": HyCAM's modules hang on `self_attn` as `hycam_modules`
NOT_MERGEABLE = "HyCAM cannot be merged into the weights: h_att * SiLU(h_norm W) is not linear in h_norm"


class HyCAMModel(BaseTuner):
    """peft's tuner of HyCAM: adapters put in by `hycam.inject`, one active at a time, not mergeable (SiLU is
    nonlinear in h_norm)."""

    prefix = PREFIX
    tuner_layer_cls = HyCAMLayer
    target_module_mapping: dict[str, list[str]] = {}  # peft tuners declare it; HyCAM finds its layers by layout

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
            raise RuntimeError(f"HyCAM as a peft method needs peft>=0.21.0, this is {peft.__version__}: older "
                               "versions write adapter files without HyCAM's tensors (see hycam.peft_tuner)")
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """The first adapter through `hycam.apply`, active and trainable (frozen in inference mode); a further one
        through `hycam.inject.add_adapter`, frozen and inactive until `set_adapter`."""
        config: HyCAMConfig = self.peft_config[adapter_name]
        if config.train_layernorms:
            raise ValueError("HyCAMConfig(train_layernorms=True) trains backbone norms, which peft's adapter file "
                             "does not hold: use hycam.apply / hycam.save for it")
        if is_applied(model):
            add_adapter(model, config, adapter_name)
        else:
            apply(model, config, adapter_name=adapter_name)
            mark_trainable(model, requires_grad=not config.inference_mode)
        modulated = (name for name, module in model.named_modules() if isinstance(module, HyCAMLayer))
        self.targeted_module_names = sorted(modulated)

    def _check_new_adapter_config(self, config: HyCAMConfig) -> None:
        """peft's own check counts adapters with a `bias` other than "none"; HyCAM's `bias` is a bool of its own
        CAMs, which every adapter may have."""

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("HyCAM is put in whole by hycam.apply, not module by module")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        mark_trainable(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """HyCAM's modules keep the dtype of the layer they modulate: the hook multiplies them into h_att, and
        peft's float32 upcast of a bf16 model's adapters would meet bf16 activations there."""

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        for cams in hycam_layers(self.model):
            cams.set_requires_grad(adapter_names, requires_grad)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Makes `adapter_name` the one active adapter, trainable unless `inference_mode`; the others frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1 or names[0] not in self.peft_config:
            raise ValueError(f"HyCAM applies one adapter at a time, one of {sorted(self.peft_config)}; got {names}")
        activate(self.model, names[0])
        mark_trainable(self.model, requires_grad=not inference_mode)
        self.active_adapter = names[0]

    def enable_adapter_layers(self) -> None:
        set_enabled(self.model, True)

    def disable_adapter_layers(self) -> None:
        """The backbone's outputs exactly, every HyCAM weight kept (peft's `disable_adapter` context)."""
        set_enabled(self.model, False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        delete_adapter(self.model, adapter_name)
        self.active_adapter = self.model.hycam_active if is_applied(self.model) else []

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError(NOT_MERGEABLE)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(NOT_MERGEABLE)

    def unmerge_adapter(self) -> None:
        """Nothing is ever merged."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """No: `convert_to_lora` approximates a weight delta W' - W, and HyCAM changes no weight."""
        return False

    def unload(self) -> nn.Module:
        """The backbone without HyCAM and without peft's config, exactly as before `get_peft_model`."""
        model = remove(self.model)
        vars(model).pop("peft_config", None)
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """This adapter's tensors of `state_dict`, FSDP2 shards gathered: peft calls it on every rank, and
        writes on the main process only (`save_pretrained(..., is_main_process=rank == 0)`)."""
        names = _hycam_names(model, adapter_name)
        return {key: whole(value) for key, value in state_dict.items() if key.removeprefix(PEFT_KEY_PREFIX) in names}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return checkpoint_name(key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The file's tensors under this model's names (hycam 0.1.0's upgraded), checked first to be exactly
        this model's HyCAM tensors (peft itself would skip missing ones)."""
        by_checkpoint_name = {checkpoint_name(name): name for name in _hycam_names(model, adapter_name)}
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


def _hycam_names(model: nn.Module, adapter_name: str) -> set[str]:
    """The names of one HyCAM adapter's tensors as the base model calls them (peft's prefix taken off)."""
    if not is_applied(model):  # a PeftModel passes attribute reads on to the model it wraps
        raise ValueError(f"{type(model).__name__} holds no HyCAM")
    return {name.removeprefix(PEFT_KEY_PREFIX) for name in hycam_parameters(model, adapter_name)}


def register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if HYCAM not in PEFT_TYPE_TO_TUNER_MAPPING:  # importlib.reload(hycam) must not register twice
        register_peft_method(name="hycam", config_cls=HyCAMConfig, model_cls=HyCAMModel, prefix=PREFIX)


register()
