"""The balance loss (Eq. 10, 13) of a HyCAM model: what one forward routed, and where every loss sees it.

One `ForwardRecord` a model holds what the current forward has produced. Four hooks fill and read it, defined
below in the order they fire in one forward (module-level functions, so that a HyCAM model pickles,
deep-copies and compiles like any model; no `forward` is replaced):

1. `before_model`: the call's loss keywords, and whether it asked for the router outputs.
2. `before_backbone`: open the list of router outputs, and note the padding mask.
   Then each decoder layer's attention hook (`hycam.inject`) adds its router's (logits, probs) to it.
3. `before_final_norm`: Eq. 10 over every layer; its gradient, weighted by this forward's share of the
   optimiser step, is attached to the norm's input (`attach_gradient`), so that whoever backpropagates a
   loss computed from the model's outputs also backpropagates `balance_coef * balance_loss`. The list closes
   here: a forward recomputed during backward (activation checkpointing) is never counted twice.
4. `after_model`: `balance_loss` (training, but for a bare backbone) and the router outputs (when asked) join the
   model's output.

`output.loss` stays the model's own task loss: adding the balance loss to it would count it twice.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput

from hycam import trainer_accumulation
from hycam.cam import HyCAM
from hycam.config import HyCAMConfig
from hycam.outputs import hycam_output_class
from hycam.routing import load_balancing_loss

ROUTING_FLAG = "output_hycam_routing"
"""Forward keyword that asks for `hycam_router_logits` / `hycam_router_probs` (popped before the forward)."""
LOSS_KEYWORDS = ("labels", "shift_labels", "num_items_in_batch")


@dataclass
class ForwardRecord:
    """What the current forward of one HyCAM model has produced; the model, its backbone, final norm and
    modulated attention modules hold it as `hycam_record`."""

    config: HyCAMConfig
    """The model's HyCAM configuration (balance_coef, balance_scope, train_router)."""
    accumulation_steps: int | None = None
    """Forwards per optimiser step as the training loop declared it (`set_gradient_accumulation`, or Trainer's
    `gradient_accumulation_steps` through `hycam.trainer_accumulation`); None: not declared. Kept across forwards."""
    undeclared: bool = False
    """Whether this forward's balance gradient was weighted without knowing the forwards of its optimiser step."""
    warned: bool = False
    """Whether the warning that a loop accumulates gradients without saying how many forwards a step has was given."""
    bare_backbone: bool = False
    """Whether HyCAM was applied to a bare backbone (`LlamaModel`): multimodal models rebuild their text model's output
    into a class of their own from its fields (`LlavaModelOutputWithPast(**outputs, ...)`), so it gets HyCAM's
    fields only when asked."""
    want_routing: bool = False
    """Whether the caller passed `output_hycam_routing=True`."""
    loss_kwargs: dict = field(default_factory=dict)
    """The call's `labels`, `shift_labels` and `num_items_in_batch` (no tensor arithmetic in the model's own
    hooks: a compiler would make a graph of each)."""
    routed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Every layer's router (logits, probs), open from the backbone's start to its final norm, else None."""
    mask: torch.Tensor | None = None
    """The backbone call's `[batch, seq_len]` attention mask."""
    residual: torch.Tensor | None = None
    """`modulate="residual"`: the current layer's input, from its start until its attention hook reads it."""
    result: dict[str, torch.Tensor] | None = None
    """What `before_final_norm` computed, until `after_model` puts it into the output."""

    def add(self, logits: torch.Tensor | None, probs: torch.Tensor | None) -> None:
        """One layer's router outputs (None: a shared CAM alone routes nothing)."""
        if self.routed is not None and logits is not None:
            self.routed.append((logits, probs))


def before_model(model: nn.Module, args: tuple, kwargs: dict):
    record: ForwardRecord = model.hycam_record
    record.want_routing = bool(kwargs.pop(ROUTING_FLAG, False))
    record.loss_kwargs = {k: kwargs[k] for k in LOSS_KEYWORDS if k in kwargs}
    return args, kwargs


def before_backbone(backbone: nn.Module, args: tuple, kwargs: dict) -> None:
    record: ForwardRecord = backbone.hycam_record
    # Generation and evaluation read neither the balance loss nor the router outputs: record nothing then
    # (holding every layer's outputs until the final norm costs ~3 % of a decoding step).
    wanted = backbone.training or record.want_routing or torch.is_grad_enabled()
    record.routed, record.result, record.undeclared = [] if wanted else None, None, False
    record.mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)


def before_final_norm(norm: nn.Module, args: tuple, kwargs: dict):
    record: ForwardRecord = norm.hycam_record
    routed, record.routed = record.routed, None
    if routed is None:  # nothing wanted (see `before_backbone`), or the norm ran outside a backbone forward
        return None
    if not routed:  # shared CAM only: nothing is routed
        record.result = {"balance_loss": torch.zeros((), device=args[0].device)}
        return None
    logits = torch.stack([r[0] for r in routed])  # (num_layers, B, L, N_s)
    probs = torch.stack([r[1] for r in routed])  # (num_layers, B, L, N_s)
    _check_router_gradient(record.config, norm.training, logits)
    # Global means need every rank in the same call: only training guarantees that (not generation).
    global_batch = record.config.balance_scope == "global" and norm.training
    balance = load_balancing_loss(logits, probs, _token_mask(record.mask, logits.size(-2)), global_batch)
    record.result = {"balance_loss": balance, "hycam_router_logits": logits, "hycam_router_probs": probs}
    if not (balance.requires_grad and record.config.balance_coef):
        return None
    hidden = attach_gradient(args[0], balance, step_weight(record, global_batch, balance))
    return (hidden, *args[1:]), kwargs


def after_model(model: nn.Module, args: tuple, output):
    record: ForwardRecord = model.hycam_record
    result, record.result, record.loss_kwargs, record.mask = record.result, None, {}, None
    if result is None:
        return output
    if not isinstance(output, ModelOutput):
        raise TypeError(f"HyCAM needs {type(model).__name__} to return a ModelOutput: do not pass return_dict=False")
    if record.undeclared and model.training and not record.warned and not torch.compiler.is_compiling():
        _warn_if_accumulating(model, record)
    unasked = model.training and not record.bare_backbone  # the balance loss, in training
    extra = {k: v for k, v in result.items() if record.want_routing or (unasked and k == "balance_loss")}
    return hycam_output_class(type(output))(**output, **extra) if extra else output


def hook_sites(model: nn.Module, backbone: nn.Module, norm: nn.Module) -> list[tuple[nn.Module, object, bool]]:
    """(module, hook, whether it runs before the module's forward), in the order they fire."""
    return [(model, before_model, True), (backbone, before_backbone, True), (norm, before_final_norm, True),
            (model, after_model, False)]


def install(model: nn.Module, backbone: nn.Module, norm: nn.Module, record: ForwardRecord) -> None:
    trainer_accumulation.register()
    record.bare_backbone = model is backbone
    for module, hook, before in hook_sites(model, backbone, norm):
        module.hycam_record = record
        if before:
            module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            module.register_forward_hook(hook)


def set_gradient_accumulation(model: nn.Module, steps: int) -> None:
    """Tells HyCAM how many forwards make one optimiser step, for loops that neither pass `num_items_in_batch`
    with the labels nor keep the count where HyCAM finds it (a plain loop, DeepSpeed's engine): each forward's
    balance loss then weighs balance_coef / steps. It overrides what an accelerate loop keeps."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"set_gradient_accumulation: steps must be a positive int, got {steps!r}")
    record = getattr(model, "hycam_record", None)
    if record is None:
        raise ValueError("this model has no HyCAM: call hycam.apply(model, config) first")
    record.accumulation_steps = steps


def step_weight(record: ForwardRecord, global_batch: bool, balance: torch.Tensor) -> torch.Tensor:
    """balance_coef times this forward's share of the optimiser step (Eq. 13 holds per step), as a tensor (a
    Python float that changes from step to step would make a compiler recompile)."""
    share = _share_of_step(record.loss_kwargs, global_batch)
    if share is None:
        steps = record.accumulation_steps or _accelerate_steps()
        record.undeclared = steps is None
        share = 1.0 / (steps or 1)
    return torch.as_tensor(share, dtype=balance.dtype, device=balance.device) * record.config.balance_coef


def _accelerate_steps() -> int | None:
    """An accelerate loop's `gradient_accumulation_steps`: accelerate keeps it in its process-wide gradient state,
    which `Accelerator.accumulate` reads. None when no Accelerator counts more than one forward a step (Trainer
    and TRL set it to 1 and count themselves: they tell HyCAM through `hycam.trainer_accumulation`)."""
    state = sys.modules.get("accelerate.state")  # no Accelerator exists unless accelerate was imported
    if state is None:
        return None
    # read, not `GradientState()`: constructing it would initialise the state where no Accelerator did
    steps = state.GradientState._shared_state.get("plugin_kwargs", {}).get("num_steps", 1)
    return steps if steps > 1 else None


def _warn_if_accumulating(model: nn.Module, record: ForwardRecord) -> None:
    """Gradients still held at a training forward mean the loop accumulates them over forwards: say so once,
    since each forward's balance loss then weighs the whole balance_coef."""
    probe = next((p for m in model.modules() if isinstance(m, HyCAM) for p in m.parameters() if p.requires_grad),
                 None)
    if probe is None or probe.grad is None:
        return
    record.warned = True
    warnings.warn("HyCAM: gradients accumulate over several forwards, but this loop does not tell HyCAM how many "
                  "make one optimiser step, so each forward's balance loss weighs the whole balance_coef. Call "
                  "hycam.set_gradient_accumulation(model, steps) once before training (steps=1 if the gradients are "
                  "kept on purpose, e.g. zero_grad(set_to_none=False)).", stacklevel=2)


def _share_of_step(kwargs: dict, global_batch: bool) -> torch.Tensor | None:
    """This micro-batch's share of the step's target tokens (`num_items_in_batch`, which Trainer counts over
    every rank by default, `average_tokens_across_devices`). Local scope: this rank's tokens times the world
    size, since DDP averages. Global scope: every rank's tokens, so that all ranks weigh their shared loss alike."""
    num_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
    if labels is None and kwargs.get("labels") is not None:
        labels = kwargs["labels"][..., 1:]  # causal LMs predict token t + 1 from position t
    if num_items is None or labels is None:
        return None
    count = labels.ne(-100).sum()
    if dist.is_available() and dist.is_initialized():
        if global_batch:
            dist.all_reduce(count)
        else:
            count = count * dist.get_world_size()
    return count / num_items


def attach_gradient(hidden: torch.Tensor, balance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden` unchanged; whatever loss is backpropagated through it also backpropagates weight * balance.

    The balance loss needs no cooperation from whoever computes the task loss (the way Megatron-LM's
    `MoEAuxLossAutoScaler` attaches MoE auxiliary losses). Its gradient ignores the size of the incoming
    one, so `weight` must say what share of the optimiser step this forward is.
    """
    return _AttachGradient.apply(hidden, balance, weight)


class _AttachGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, balance, weight):
        ctx.save_for_backward(weight)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        (weight,) = ctx.saved_tensors
        return grad_hidden, weight, None


def _token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The `[batch, seq_len]` padding mask of this call's tokens (with a KV cache, the last ones)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


def _check_router_gradient(config: HyCAMConfig, training: bool, logits: torch.Tensor) -> None:
    # Reentrant checkpointing runs the forward under no_grad: the stacked logits would carry no
    # gradient and the balance loss would silently train nothing.
    if config.train_router and training and torch.is_grad_enabled() and not logits.requires_grad:
        raise RuntimeError(
            "HyCAM router outputs carry no gradient, so the balance loss cannot train the router. Enable "
            "checkpointing with hycam.enable_checkpointing(model), or pass {'use_reentrant': False} to the "
            "model's activation_checkpointing_enable (gradient_checkpointing_enable before transformers 5)."
        )
