"""HyCAM: Hybrid Contextual Attention Modulation for transformers causal LMs (CIKM 2025)."""

from hycam.checkpoint import load, save
from hycam.config import HyCAMConfig
from hycam.inject import apply, decoder_layers, hycam_parameters, is_applied, remove, trainable_parameters
from hycam.outputs import HyCAMCausalLMOutput, enable_checkpointing
from hycam.peft_tuner import HyCAMModel  # registers HyCAM as a peft method
from hycam.routing import gumbel_route, load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "HyCAMCausalLMOutput",
    "HyCAMConfig",
    "HyCAMModel",
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
    "trainable_parameters",
]
