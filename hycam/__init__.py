"""HyCAM: Hybrid Contextual Attention Modulation for transformers decoders (CIKM 2025)."""

from hycam.activation_checkpointing import enable_checkpointing
from hycam.balance import set_gradient_accumulation
from hycam.checkpoint import load, save
from hycam.config import HyCAMConfig
from hycam.inject import apply, decoder_layers, hycam_parameters, is_applied, remove, trainable_parameters
from hycam.outputs import HyCAMCausalLMOutput, HyCAMModelOutput
from hycam.peft_tuner import HyCAMModel  # registers HyCAM as a peft method
from hycam.routing import gumbel_route, load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "HyCAMCausalLMOutput",
    "HyCAMConfig",
    "HyCAMModel",
    "HyCAMModelOutput",
    "apply",
    "decoder_layers",
    "enable_checkpointing",
    "gumbel_route",
    "hycam_parameters",
    "is_applied",
    "load",
    "load_balancing_loss",
    "remove",
    "save",
    "set_gradient_accumulation",
    "trainable_parameters",
]
