"""HyCAM configuration: one typed dataclass whose defaults are the paper's.

It is a `peft.PeftConfig` too, so that `peft.get_peft_model(model, HyCAMConfig(...))`, TRL's
`peft_config=` and peft's `adapter_config.json` take it as they take a `LoraConfig`. Its own fields
(the HyCAM ones) are what `hycam.save` writes and, but for the initialisation-only `init_std`, what two
configs are compared on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import Literal

from peft import PeftConfig

from hycam.peft_type import HYCAM

NON_IDENTITY_STD = 0.02
"""`init_std` under peft's `init_weights=False`: a modulation of a few percent at the start, as peft's tests want."""
VARIANTS = ("hycam", "shared_only", "full_spec", "spec_only", "inverse_peft", "authors")


@dataclass(eq=False)
class HyCAMConfig(PeftConfig):
    """What HyCAM adds to a model (paper Section 3.3; defaults from its Section 4.1.5).

    The fields inherited from `PeftConfig` (`peft_type`, `task_type`, `base_model_name_or_path`,
    `inference_mode`, ...) are peft's bookkeeping; HyCAM itself reads only the fields below.
    """

    task_type: str | None = "CAUSAL_LM"
    """peft's task type; HyCAM adapts causal LMs, so peft wraps it in a `PeftModelForCausalLM`."""

    num_specialized: int = 5
    """N_s, the number of specialized CAMs routed per token; 0 leaves only the shared CAM."""
    rank: int | None = 64
    """Rank r of each specialized CAM (W_k = B_k N_k A_k); None makes each W_k a full d x d matrix."""
    shared: bool = True
    """Whether the full-parameter shared CAM is present (False: the SpecOnly ablation)."""
    shared_rank: int | None = None
    """None: W_shared is full rank (paper). An int: W_shared = B N A of that rank (InversePEFT)."""
    tau: float = 0.5
    """Gumbel-softmax temperature (Eq. 9)."""
    balance_coef: float = 0.1
    """lambda_balance: weight of the load-balancing loss in the total loss (Eq. 13)."""
    hard_routing: bool = False
    """Straight-through one-hot routing (the authors' code) instead of soft probabilities (paper)."""
    eval_noise: bool = False
    """Draw Gumbel noise in eval mode too (the authors' code); off makes evaluation deterministic."""
    modulate: Literal["attention", "residual"] = "attention"
    """'attention': h_att + h_att * A (paper). 'residual': (residual + h_att) * (1 + A) (authors' code)."""
    lora_alpha: float | None = None
    """If set, scale the specialized pre-activation by lora_alpha / rank (the authors use 32)."""
    bias: bool = False
    """Give every CAM projection a zero-initialised bias (the authors' code)."""
    train_layernorms: bool = False
    """Also train the decoder layers' two norms (the authors' name filter does this)."""
    train_router: bool = True
    """Train the router; the authors' name filter misses it, so their router keeps its random init."""
    layers: list[int] | None = None
    """Indices of the decoder layers that get HyCAM; None means every layer."""
    balance_scope: Literal["local", "global"] = "local"
    """Average the balance-loss means over this rank's tokens, or over all data-parallel ranks. "global"
    applies in train mode only: an eval-mode forward (validation, generation) may run on one rank alone."""
    init_std: float = field(default=0.0, repr=False)
    """Std of a normal init for the zero-initialised weights (B_k, W_shared); tests use it to start
    from a non-trivial modulation. 0.0 is the paper's zero init. Initialisation only: configs that differ in it
    alone are equal, and a checkpoint loads into a model applied with another init_std."""
    init_weights: InitVar[bool] = True
    """peft's switch of every method's identity init: False means `init_std=NON_IDENTITY_STD` unless set.
    Not kept (not a field): what it sets is `init_std`."""
    layers_to_transform: InitVar[list[int] | int | None] = None
    """peft's name of `layers` (an int is one layer). Not kept: what it sets is `layers`."""

    def __post_init__(self, init_weights: bool = True, layers_to_transform: list[int] | int | None = None) -> None:
        super().__post_init__()
        if not init_weights and not self.init_std:
            self.init_std = NON_IDENTITY_STD
        if layers_to_transform is not None:
            if self.layers is not None:
                raise ValueError("HyCAMConfig: give layers or peft's layers_to_transform, not both")
            self.layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        self.peft_type = HYCAM
        for name in HYCAM_FIELDS:
            _check_type(name, getattr(self, name), _FIELD_TYPES[name])
        if self.layers is not None:
            self.layers = list(self.layers)  # a tuple and its JSON list describe the same layers
        if self.num_specialized < 0:
            raise ValueError(f"num_specialized must be >= 0, got {self.num_specialized}")
        if not self.shared and self.num_specialized == 0:
            raise ValueError("HyCAMConfig: no shared CAM and num_specialized=0 leaves nothing to train")
        for name in ("rank", "shared_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"HyCAMConfig.{name} must be a positive int or None, got {value}")
        if self.tau <= 0:
            raise ValueError(f"HyCAMConfig.tau must be > 0, got {self.tau}")
        if self.modulate not in ("attention", "residual"):
            raise ValueError(f"HyCAMConfig.modulate must be 'attention' or 'residual', got {self.modulate!r}")
        if self.balance_scope not in ("local", "global"):
            raise ValueError(f"HyCAMConfig.balance_scope must be 'local' or 'global', got {self.balance_scope!r}")
        if self.lora_alpha is not None and self.rank is None:
            raise ValueError("HyCAMConfig.lora_alpha scales a low-rank path: set rank too")

    @classmethod
    def variant(cls, name: str, **overrides) -> HyCAMConfig:
        """The paper's HyCAM, one of its ablations, or the authors' code's choices, by name."""
        presets = {
            "hycam": {},
            "shared_only": {"num_specialized": 0},
            "full_spec": {"rank": None},
            "spec_only": {"shared": False},
            "inverse_peft": {"rank": None, "shared_rank": 64},
            "authors": {"hard_routing": True, "eval_noise": True, "modulate": "residual",
                        "lora_alpha": 32.0, "bias": True, "train_layernorms": True,
                        "train_router": False, "balance_coef": 0.0},
        }
        if name not in presets:
            raise ValueError(f"unknown HyCAM variant {name!r}; choose one of {', '.join(VARIANTS)}")
        return cls(**{**presets[name], **overrides})

    def hycam_dict(self) -> dict:
        """The HyCAM fields only: what `hycam_config.json` holds."""
        return {name: getattr(self, name) for name in HYCAM_FIELDS}

    def differences(self, other: HyCAMConfig) -> list[str]:
        """'field: mine vs other' for every HyCAM field in which the two configs differ, but `init_std`: how
        weights were first drawn does not change what trained (or loaded) weights compute."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
                for name in HYCAM_FIELDS if name not in INIT_ONLY and getattr(self, name) != getattr(other, name)]

    def __eq__(self, other: object) -> bool:
        # peft's bookkeeping (its version, the base model's name) and init_std do not change what HyCAM computes
        return isinstance(other, HyCAMConfig) and not self.differences(other)

    @classmethod
    def from_dict(cls, values: dict) -> HyCAMConfig:
        """From `hycam_dict()` or peft's `to_dict()` (an `adapter_config.json`); unknown keys are refused."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown HyCAMConfig fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k != "peft_type"})


HYCAM_FIELDS = tuple(f.name for f in dataclasses.fields(HyCAMConfig) if f.name not in
                     {f.name for f in dataclasses.fields(PeftConfig)})
INIT_ONLY = ("init_std",)
"""HyCAM fields that only say how weights are first drawn: saved, but not compared."""
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(HyCAMConfig)}
_KINDS = {"int": int, "float": (int, float), "bool": bool, "None": type(None), "list[int]": (list, tuple)}


def _check_type(name: str, value, annotation: str) -> None:
    """Refuses a value of the wrong type, e.g. rank=8.0 or hard_routing="false" (JSON and YAML give these)."""
    options = [part.strip() for part in annotation.split("|")]
    for option in options:
        kind = str if option.startswith("Literal[") else _KINDS[option]
        # bool is an int in Python: True is no rank, and 1 is no bool
        if isinstance(value, kind) and isinstance(value, bool) == (option == "bool"):
            if option != "list[int]" or all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return
    raise TypeError(f"HyCAMConfig.{name} must be {' or '.join(options)}, got {value!r} ({type(value).__name__})")
