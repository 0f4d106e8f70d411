"""What HyCAM's routers did, gathered during one forward, and the balance loss put where every loss sees it.

Three forward hooks, module-level functions (so a HyCAM model pickles, deep-copies and compiles like any
model; no `forward` is replaced):

- on the backbone (the module holding the decoder layers), before its forward: open a list the routers
  append to. It exists until the final norm runs, so a forward recomputed during backward (activation
  checkpointing) is never counted twice.
- on the backbone's final norm, before it runs: Eq. 10 over every recorded layer, and its gradient
  attached to the norm's input (`routing.attach_balance_gradient`). Every output of the model (logits,
  TRL's fused log-probabilities, a classification head) is computed from that tensor, so whoever
  backpropagates a loss computed from the outputs also backpropagates `balance_coef * balance_loss`.
  `output.loss` stays the model's own task loss: adding the balance loss to it would count it twice.
- on the model, after its forward: `balance_loss` (in training mode) and the router outputs (when asked)
  are added to the model's own output: an instance of `hycam_output_class(its class)`, e.g.
  `HyCAMCausalLMOutput` for `CausalLMOutputWithPast`, `HyCAMModelOutput` for a bare backbone's.

How much of the step a forward's balance loss carries (Eq. 13 holds per optimiser step):
`num_items_in_batch` (what transformers' Trainer and TRL pass) with the labels gives this micro-batch's
share of the step's target tokens; without it each forward carries 1 / `set_gradient_accumulation(...)`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from hycam.routing import attach_balance_gradient, load_balancing_loss

ROUTING_FLAG = "output_hycam_routing"
"""Forward keyword that asks for `hycam_router_logits` / `hycam_router_probs` (popped before the forward)."""


class RoutingRecorder:
    """One per HyCAM model, shared by its routers and hooks: what the current forward routed."""

    def __init__(self, config) -> None:
        self.config = config
        self.records: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        """The routers' (logits, probs), open from the backbone's start to its final norm, else None."""
        self.mask: torch.Tensor | None = None
        """The backbone call's `[batch, seq_len]` attention mask."""
        self.loss_kwargs: dict = {}
        """The model call's `labels`, `shift_labels` and `num_items_in_batch`, read by the final norm's hook
        (no tensor arithmetic in the model's own hooks: a compiler would make a graph of each)."""
        self.want_routing = False
        """Whether the caller passed `output_hycam_routing=True`."""
        self.result: dict[str, torch.Tensor] | None = None
        """What the final norm's hook computed, until the model's post-hook puts it into the output."""
        self.accumulation_steps = 1
        """Forwards per optimiser step when the caller gives no `num_items_in_batch`."""

    def record(self, logits: torch.Tensor, probs: torch.Tensor) -> None:
        if self.records is not None:
            self.records.append((logits, probs))


def set_gradient_accumulation(model: nn.Module, steps: int) -> None:
    """Tells HyCAM how many forwards make one optimiser step, for loops that pass no `num_items_in_batch`
    (a plain loop, DeepSpeed's engine): each forward's balance loss then weighs balance_coef / steps."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"set_gradient_accumulation: steps must be a positive int, got {steps!r}")
    recorder = getattr(model, "hycam_recorder", None)
    if recorder is None:
        raise ValueError("this model has no HyCAM: call hycam.apply(model, config) first")
    recorder.accumulation_steps = steps


def install(model: nn.Module, backbone: nn.Module, norm: nn.Module, recorder: RoutingRecorder) -> None:
    for module in {id(m): m for m in (model, backbone, norm)}.values():
        module.hycam_recorder = recorder
    model.register_forward_pre_hook(_begin_call, with_kwargs=True)
    backbone.register_forward_pre_hook(_open_records, with_kwargs=True)
    norm.register_forward_pre_hook(_attach_balance)
    model.register_forward_hook(_finish_call)


def uninstall(model: nn.Module, backbone: nn.Module, norm: nn.Module) -> None:
    for module, hook, pre in ((model, _begin_call, True), (backbone, _open_records, True),
                              (norm, _attach_balance, True), (model, _finish_call, False)):
        drop_hooks(module, hook, pre)
    for module in (model, backbone, norm):
        vars(module).pop("hycam_recorder", None)  # absent after a failed apply


def drop_hooks(module: nn.Module, hook, pre: bool = False) -> None:
    # Handles are not kept: a deep-copied model would share them with the original.
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    with_kwargs = module._forward_pre_hooks_with_kwargs if pre else module._forward_hooks_with_kwargs
    for hook_id in [i for i, fn in hooks.items() if fn is hook]:
        del hooks[hook_id]
        with_kwargs.pop(hook_id, None)


def _begin_call(model: nn.Module, args: tuple, kwargs: dict):
    recorder = model.hycam_recorder
    recorder.want_routing = bool(kwargs.pop(ROUTING_FLAG, False))
    recorder.loss_kwargs = {k: kwargs[k] for k in ("labels", "shift_labels", "num_items_in_batch") if k in kwargs}
    return args, kwargs


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


def _open_records(backbone: nn.Module, args: tuple, kwargs: dict) -> None:
    recorder = backbone.hycam_recorder
    # Generation and evaluation read neither the balance loss nor the router outputs: record nothing then
    # (holding every layer's outputs until the final norm costs ~3 % of a decoding step).
    wanted = backbone.training or recorder.want_routing or torch.is_grad_enabled()
    recorder.records, recorder.result = [] if wanted else None, None
    recorder.mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)


def _attach_balance(norm: nn.Module, args: tuple):
    recorder: RoutingRecorder = norm.hycam_recorder
    records, recorder.records = recorder.records, None
    if records is None:  # nothing wanted (see `_open_records`), or the norm ran outside a backbone forward
        return None
    if not records:  # shared CAM only: nothing is routed
        recorder.result = {"balance_loss": torch.zeros((), device=args[0].device)}
        return None
    logits = torch.stack([r[0] for r in records])  # (num_layers, B, L, N_s)
    probs = torch.stack([r[1] for r in records])  # (num_layers, B, L, N_s)
    config = recorder.config
    _check_router_gradient(config, norm.training, logits)
    # Global means need every rank in the same call: only training guarantees that (not generation).
    global_batch = config.balance_scope == "global" and norm.training
    balance = load_balancing_loss(logits, probs, _token_mask(recorder.mask, logits.size(-2)), global_batch)
    recorder.result = {"balance_loss": balance, "hycam_router_logits": logits, "hycam_router_probs": probs}
    if not (balance.requires_grad and config.balance_coef):
        return None
    return (attach_balance_gradient(args[0], balance, _balance_weight(recorder, global_batch, balance)), *args[1:])


def _balance_weight(recorder: RoutingRecorder, global_batch: bool, balance: torch.Tensor) -> torch.Tensor:
    """balance_coef times this forward's share of the optimiser step, as a tensor (a Python float that changes
    from step to step would make a compiler recompile)."""
    share = _share_of_step(recorder.loss_kwargs, global_batch)
    share = 1.0 / recorder.accumulation_steps if share is None else share
    return torch.as_tensor(share, dtype=balance.dtype, device=balance.device) * recorder.config.balance_coef


def _finish_call(model: nn.Module, args: tuple, output):
    recorder = model.hycam_recorder
    result, recorder.result, recorder.loss_kwargs, recorder.mask = recorder.result, None, {}, None
    if result is None:
        return output
    if not isinstance(output, ModelOutput):
        raise TypeError(f"HyCAM needs {type(model).__name__} to return a ModelOutput: do not pass return_dict=False")
    extra = {k: v for k, v in result.items() if recorder.want_routing or (model.training and k == "balance_loss")}
    return hycam_output_class(type(output))(**output, **extra) if extra else output


def hycam_output_class(base: type) -> type:
    """`base` (a transformers ModelOutput) with HyCAM's fields: a class of its own, since data parallelism and
    compilers rebuild outputs from their class's fields."""
    if base not in _OUTPUT_CLASSES:
        name = f"HyCAM{base.__name__}"
        fields = [(key, torch.Tensor | None, dataclasses.field(default=None)) for key in HYCAM_FIELDS]
        doc = f"{base.__name__} plus HyCAM's {', '.join(HYCAM_FIELDS)} (see `hycam.outputs.HYCAM_FIELDS`)."
        namespace = {"__doc__": doc, "__module__": __name__}
        cls = dataclasses.make_dataclass(name, fields, bases=(base,), namespace=namespace)
        globals()[name] = _OUTPUT_CLASSES[base] = cls  # found by name when an output is unpickled
    return _OUTPUT_CLASSES[base]


HYCAM_FIELDS = ("balance_loss", "hycam_router_logits", "hycam_router_probs")
"""balance_loss: Eq. 10 over the non-padding tokens of all layers stacked, unweighted (in training mode, or when
asked). hycam_router_logits, hycam_router_probs: `[num_layers, batch, seq_len, num_specialized]`, the router
logits and the Gumbel-softmax probabilities the fusion used (when asked with `output_hycam_routing=True`)."""
_OUTPUT_CLASSES: dict[type, type] = {}
HyCAMCausalLMOutput = hycam_output_class(CausalLMOutputWithPast)
HyCAMModelOutput = hycam_output_class(BaseModelOutputWithPast)


def _token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The `[batch, seq_len]` padding mask of this call's tokens (with a KV cache, the last ones)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


def _check_router_gradient(config, training: bool, logits: torch.Tensor) -> None:
    # Reentrant checkpointing runs the forward under no_grad: the stacked logits would carry no
    # gradient and the balance loss would silently train nothing.
    if config.train_router and training and torch.is_grad_enabled() and not logits.requires_grad:
        raise RuntimeError(
            "HyCAM router outputs carry no gradient, so the balance loss cannot train the router. Enable "
            "checkpointing with hycam.enable_checkpointing(model), or pass {'use_reentrant': False} to the "
            "model's activation_checkpointing_enable (gradient_checkpointing_enable before transformers 5)."
        )


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers, non-reentrant (the only kind HyCAM's router trains
    under), through whichever name this transformers has: activation_checkpointing_enable (5.x) or
    gradient_checkpointing_enable (4.x, deprecated in 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
