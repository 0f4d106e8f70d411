"""Multi LoRA and RieMoE-LoRA baselines on tiny Llama / Qwen2 / Mistral models."""

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, padded_batch, tiny_model
from torch import nn

import hycam
from hycam import enable_checkpointing
from hycam.baselines.adapters import adapter_parameters
from hycam.baselines.multilora import MultiLoRALinear, apply_multilora
from hycam.baselines.riemoe import (MoELoRALinear, apply_riemoe, expert_pairs, precondition_grad_a, precondition_grad_b,
                                    register_riemannian_hooks)

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = {
    "multilora": (lambda m: apply_multilora(m, num_adapters=3, rank=4, alpha=8.0), ("lora_A", "lora_B", "lora_scale")),
    "riemoe": (lambda m: apply_riemoe(m, num_experts=3, rank=4, alpha=8.0), ("lora_A", "lora_B", "router.weight")),
}


def labelled(batch: dict) -> dict:
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    batch = labelled(padded_batch())
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(model(**batch).loss)
        losses[-1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return [loss.item() for loss in losses]


def precondition_accumulated(model: nn.Module, delta: float = 1e-6) -> None:
    """The Riemannian preconditioner applied once to the accumulated `.grad`s: what the hooks must equal."""
    with torch.no_grad():
        for lora_a, lora_b in expert_pairs(model).values():
            grad_a = precondition_grad_a(lora_a.grad, lora_b, delta)  # reads B, not its gradient: order is free
            lora_b.grad.copy_(precondition_grad_b(lora_b.grad, lora_a, delta))
            lora_a.grad.copy_(grad_a)


def randomise_b(model: nn.Module, seed: int = 3) -> None:
    """B starts at zero; a random B makes grad_A and the preconditioner non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lora_b in expert_pairs(model).values():
            lora_b.copy_(torch.randn(lora_b.shape, generator=generator, dtype=lora_b.dtype) * 0.1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_logits_unchanged_at_init(family, method):
    model, batch = tiny_model(family), padded_batch()
    with torch.no_grad():
        before = model(**batch).logits
        METHODS[method][0](model)
        after = model(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainable_set_is_exactly_the_adapters(method):
    model = METHODS[method][0](tiny_model())
    expected = {f"model.layers.{i}.{proj}.{p}" for i in range(2) for proj in PROJECTIONS for p in METHODS[method][1]}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert set(adapter_parameters(model)) == expected


@pytest.mark.parametrize("method", sorted(METHODS))
def test_backbone_gets_no_gradient(method):
    model = METHODS[method][0](tiny_model())
    model(**labelled(padded_batch())).loss.backward()
    adapters = set(adapter_parameters(model))
    assert all(p.grad is None for name, p in model.named_parameters() if name not in adapters)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_steps_change_every_adapter_tensor_and_no_backbone_tensor(method):
    model = METHODS[method][0](tiny_model())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, steps=2)  # MultiLoRA's zero scale gives A and B no gradient before the first step
    adapters = set(adapter_parameters(model))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in adapters), name


@pytest.mark.parametrize("method", ["multilora", "riemoe", "riemoe+hooks"])
def test_a_few_steps_lower_the_loss(method):
    model = METHODS[method.split("+")[0]][0](tiny_model())
    if method.endswith("hooks"):
        register_riemannian_hooks(model)
    losses = train(model, steps=10)
    assert losses[-1] < losses[0] - 0.3, losses


def test_multilora_is_the_scaled_sum_of_its_adapters():
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(6, 5), num_adapters=3, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_scale)
    x = torch.randn(2, 4, 6)
    expected = layer.base(x) + 2.0 * sum(
        (x @ layer.lora_A[i].T @ layer.lora_B[i].T) * layer.lora_scale[i] for i in range(3))
    torch.testing.assert_close(layer(x), expected)


def gated_sum(layer: MoELoRALinear, x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """W x + (alpha / r) sum_e g_e B_e A_e x, the gates from `router`, one expert at a time."""
    gates = torch.softmax(x @ router.T, dim=-1)  # (..., E)
    return layer.base(x) + layer.scaling * sum(
        gates[..., e:e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(gates.size(-1)))


def test_moelora_is_the_gated_sum_of_its_experts():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(6, 5), num_experts=3, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), gated_sum(layer, x, layer.router.weight))


def test_gate_rescale_keeps_the_output_and_gives_experts_sqrt_gate_gradients():
    torch.manual_seed(0)
    rescaled = MoELoRALinear(nn.Linear(6, 5).double(), num_experts=3, rank=2, alpha=4.0)
    nn.init.normal_(rescaled.lora_B)
    x, w = torch.randn(7, 6, dtype=torch.double), torch.randn(7, 5, dtype=torch.double)
    router = rescaled.router.weight.detach().clone().requires_grad_()
    out_rescaled = rescaled(x)
    torch.testing.assert_close(out_rescaled, gated_sum(rescaled, x, router))
    (out_rescaled * w).sum().backward()
    plain_grad, = torch.autograd.grad((gated_sum(rescaled, x, router) * w).sum(), router)  # the plain gated sum's
    torch.testing.assert_close(rescaled.router.weight.grad, plain_grad)
    root = torch.softmax(x @ rescaled.router.weight.T, -1).detach().sqrt()  # (T, E)
    a, b = rescaled.lora_A.detach(), rescaled.lora_B.detach()
    hidden = torch.einsum("eri,ti->ter", a, x)  # (T, E, r)
    torch.testing.assert_close(rescaled.lora_B.grad, 2.0 * torch.einsum("te,to,ter->eor", root, w, hidden))
    torch.testing.assert_close(rescaled.lora_A.grad, 2.0 * torch.einsum("te,eor,to,ti->eri", root, b, w, x))


def test_preconditioner_maps_grads_as_the_formula():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(7, 6).double(), num_experts=2, rank=3, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    (layer(torch.randn(5, 7, dtype=torch.double)) ** 2).sum().backward()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    precondition_accumulated(layer, delta=0.1)
    eye = torch.eye(3, dtype=torch.double)
    for e in range(2):
        a, b = layer.lora_A[e].detach(), layer.lora_B[e].detach()
        torch.testing.assert_close(layer.lora_A.grad[e], torch.linalg.inv(b.T @ b + 0.1 * eye) @ grad_a[e])
        torch.testing.assert_close(layer.lora_B.grad[e], grad_b[e] @ torch.linalg.inv(a @ a.T + 0.1 * eye))


def test_preconditioner_pairs_by_name_not_by_parameter_order():
    model = apply_riemoe(tiny_model(), num_experts=2, rank=3, alpha=3.0)
    randomise_b(model)
    shuffled = copy.deepcopy(model)
    for module in shuffled.modules():
        if isinstance(module, MoELoRALinear):
            module._parameters["lora_A"] = module._parameters.pop("lora_A")  # lora_B now comes first
    assert [n for n, _ in shuffled.named_parameters()] != [n for n, _ in model.named_parameters()]
    for m in (model, shuffled):
        m(**labelled(padded_batch())).loss.backward()
        precondition_accumulated(m)
    grads = dict(shuffled.named_parameters())
    for name, param in adapter_parameters(model).items():
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hooks_equal_the_function_on_accumulated_grads(checkpointing):
    hooked = apply_riemoe(tiny_model(), num_experts=2, rank=3, alpha=3.0)
    randomise_b(hooked)
    plain = copy.deepcopy(hooked).train()
    register_riemannian_hooks(hooked)
    if checkpointing:
        enable_checkpointing(hooked)
    for m in (hooked.train(), plain):
        for seed in (1, 2):  # two micro-batches accumulate before the step
            m(**labelled(padded_batch(seed=seed))).loss.backward()
    precondition_accumulated(plain)
    grads = dict(plain.named_parameters())
    for name, param in adapter_parameters(hooked).items():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_trains_in_bf16(method):
    model = METHODS[method][0](tiny_model().to(torch.bfloat16))
    if method == "riemoe":
        register_riemannian_hooks(model)
    model(**labelled(padded_batch())).loss.backward()
    for name, param in adapter_parameters(model).items():
        assert param.dtype == torch.bfloat16 and param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad).all(), name


def test_sizes_come_from_in_and_out_features_not_the_weight_shape():
    linear = nn.Linear(8, 5)
    linear.weight = nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves between forward passes
    multi, moe = MultiLoRALinear(linear, 2, 3, 3.0), MoELoRALinear(linear, 2, 3, 3.0)
    assert multi.lora_A.shape == moe.lora_A.shape == (2, 3, 8)
    assert multi.lora_B.shape == moe.lora_B.shape == (2, 5, 3)
    assert moe.router.weight.shape == (2, 8)


def test_zero3_partitioned_experts_are_refused():
    model = apply_riemoe(tiny_model(), num_experts=2, rank=3, alpha=3.0)
    register_riemannian_hooks(model)
    next(iter(expert_pairs(model).values()))[0].ds_id = 0  # the mark ZeRO-3 puts on partitioned parameters
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        model(**labelled(padded_batch())).loss.backward()


def test_bad_calls_raise_clear_errors():
    model = apply_multilora(tiny_model(), num_adapters=2, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_riemoe(model)
    with pytest.raises(ValueError, match="no MoELoRALinear"):
        expert_pairs(model)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_multilora(hycam.apply(tiny_model()))


def test_hooks_precondition_under_deepspeed_zero2_with_accumulation():
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ["PYTHONPATH"]])}  # for conftest
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "relative error" in run.stdout


def _deepspeed_zero2_check() -> None:
    """ZeRO-2, 2 micro-batches, one SGD step = SGD on preconditioned grads (error ~0.75 without hooks)."""
    import deepspeed

    reference = apply_riemoe(tiny_model(), num_experts=2, rank=3, alpha=3.0)
    randomise_b(reference)
    model = copy.deepcopy(reference)
    for seed in (1, 2):
        (reference.train()(**labelled(padded_batch(seed=seed))).loss / 2).backward()
    precondition_accumulated(reference)
    register_riemannian_hooks(model)
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "optimizer": {"type": "SGD", "params": {"lr": 1.0}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=adapter_parameters(model).values(), config=config)
    engine.train()
    for seed in (1, 2):
        engine.backward(engine(**labelled(padded_batch(seed=seed))).loss)
        engine.step()
    stepped = expert_pairs(engine.module)
    worst = 0.0
    for name, pair in expert_pairs(reference).items():
        for before, after in zip(pair, stepped[name]):
            want = before.detach() - before.grad
            worst = max(worst, ((after.detach() - want).norm() / before.grad.norm()).item())
    assert worst < 1e-3, worst
    print(f"relative error {worst:.2e}")


if __name__ == "__main__":
    _deepspeed_zero2_check()
