"""The fast path (`hycam.fast`) computes what the reference forward computes, with less memory."""

import copy
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_model
from torch import nn

import hycam
from hycam import fast
from hycam.cam import HyCAM
from hycam.fast import weighted_silu_sum

pytestmark = pytest.mark.fast
VARIANTS = {"hycam": {"rank": 8}, "shared_only": {"rank": 8}, "full_spec": {}, "spec_only": {"rank": 8},
            "inverse_peft": {"shared_rank": 8}, "authors": {"rank": 8}}
"""Each variant of `HyCAMConfig.variant`, low-rank ones at rank 8."""


def reference(x, up, bias, probs):
    """sum_k p_k SiLU(x_k B_k^T + b_k), one expert at a time."""
    terms = [F.silu(x[..., k, :] @ up[k].T + (0 if bias is None else bias[k])) for k in range(up.size(0))]
    return sum(probs[..., k : k + 1] * term for k, term in enumerate(terms))


def expert_major(tokens=6, experts=3, rank=4, dtype=torch.float64):
    """x as the fast path passes it: a (tokens, N_s, r) view of an (N_s, tokens, r) tensor."""
    return torch.randn(experts, tokens, rank, dtype=dtype).transpose(0, 1)


def variant_cam(variant, dtype, seed=0, hidden=32):
    torch.manual_seed(seed)
    config = hycam.HyCAMConfig.variant(variant, init_std=0.1, **VARIANTS[variant])
    cam = HyCAM(hidden, config, dtype=dtype)
    with torch.no_grad():  # the authors' zero-initialised biases, made non-trivial
        for bias in (cam.b_shared, cam.b_spec, cam.b_router):
            if bias is not None:
                bias.normal_(std=0.1)
    return cam


def outputs_and_grads(cam, h, forward, seed):
    """A_fusion, logits, probs and the gradients of h and of every parameter, after one seeded forward."""
    h = h.detach().clone().requires_grad_()
    cam.zero_grad()
    torch.manual_seed(seed)  # the same Gumbel draw in both paths
    fusion, logits, probs = forward(h)
    weight = torch.linspace(-1, 1, fusion.numel(), dtype=fusion.dtype).view(fusion.shape)
    (fusion * weight).sum().backward()
    grads = {"h": h.grad, **{name: p.grad for name, p in cam.named_parameters()}}
    return [fusion.detach(), logits, probs], grads


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_fast_path_equals_the_reference_in_float64_outputs_and_gradients(variant, mode):
    cam = variant_cam(variant, torch.float64).train(mode == "train")
    h = torch.randn(2, 12, 32, dtype=torch.float64)  # more than 16 tokens: the scratch memory is used
    fast_out, fast_grads = outputs_and_grads(cam, h, cam, seed=3)
    ref_out, ref_grads = outputs_and_grads(cam, h, cam.reference_forward, seed=3)
    assert fast_grads.keys() == ref_grads.keys() and all(g is not None for g in ref_grads.values())
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_grads, ref_grads, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the in-place inference arithmetic, one token and many
        torch.manual_seed(3)
        torch.testing.assert_close(cam(h)[0], ref_out[0], rtol=1e-10, atol=1e-10)
        torch.manual_seed(4)
        one = cam(h[:1, -1:])[0]
        torch.manual_seed(4)
        torch.testing.assert_close(one, cam.reference_forward(h[:1, -1:])[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_fast_path_in_bfloat16_stays_close_to_the_reference_in_float64(variant, mode):
    cam = variant_cam(variant, torch.bfloat16).train(mode == "train")
    precise = copy.deepcopy(cam).double()
    h = torch.randn(2, 24, 32, dtype=torch.float64)
    low_out, low_grads = outputs_and_grads(cam, h.bfloat16(), cam, seed=5)
    ref_out, ref_grads = outputs_and_grads(precise, h, precise.reference_forward, seed=5)
    low_out = [t if t is None else t.double() for t in low_out]
    for got, want in zip([*low_out, *low_grads.values()], [*ref_out, *ref_grads.values()]):
        if want is not None:
            assert (got.double() - want).abs().max() <= 0.03 * want.abs().max() + 1e-3


def test_hycam_holds_no_linear_layer_so_peft_all_linear_and_the_baselines_skip_it():
    cam = variant_cam("authors", torch.float32)
    assert not any(isinstance(m, nn.Linear) for m in cam.modules())


def test_gradients_match_autograd_for_expert_major_inputs_with_bias():
    x = expert_major().requires_grad_()
    up = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_silu_sum, (x, up, bias, probs))


def test_inference_path_equals_the_autograd_path():
    x, up, probs = expert_major(), torch.randn(3, 5, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with torch.no_grad():
        plain = weighted_silu_sum(x, up, None, probs)
    tracked = weighted_silu_sum(x, up.requires_grad_(), None, probs)
    assert tracked.requires_grad and not plain.requires_grad
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain, reference(x, up.detach(), None, probs))


def test_results_do_not_share_the_reused_scratch_memory():
    up = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    x1, p1 = expert_major().requires_grad_(), torch.rand(6, 3, dtype=torch.float64)
    first = weighted_silu_sum(x1, up, None, p1)
    kept = first.detach().clone()
    second = weighted_silu_sum(expert_major(tokens=9), up, None, torch.rand(9, 3, dtype=torch.float64))
    first.sum().backward()
    grad_x1 = x1.grad.clone()
    second.sum().backward()
    torch.testing.assert_close(first.detach(), kept, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, grad_x1, rtol=0, atol=0)


def test_training_after_inference_mode_reuses_scratch_memory():
    x, up, probs = expert_major(), torch.randn(3, 5, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    with torch.inference_mode():  # scratch memory first allocated here must stay writable outside
        weighted_silu_sum(expert_major(tokens=500), up, None, torch.rand(500, 3, dtype=torch.float64))
    up.requires_grad_()
    weighted_silu_sum(x, up, None, probs).sum().backward()
    expected = torch.autograd.grad(reference(x, up, None, probs).sum(), up)[0]
    torch.testing.assert_close(up.grad, expected)


def test_threads_do_not_share_scratch_memory():
    up = torch.randn(3, 64, 4, dtype=torch.float64)
    inputs = [(expert_major(tokens=200 + i), torch.rand(200 + i, 3, dtype=torch.float64)) for i in range(4)]
    expected = [reference(x, up, None, p) for x, p in inputs]
    failures = []

    def work(i):
        x, p = inputs[i]
        for _ in range(30):
            if not torch.allclose(weighted_silu_sum(x, up, None, p), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_remove_frees_the_scratch_memory():
    fast.release_workspace()  # earlier tests' buffers (other dtypes) are not this model's
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(init_std=0.02))
    model(**padded_batch()).logits.sum().backward()
    buffers = [weakref.ref(b) for b in vars(fast._scratch)["buffers"].values()]
    assert len(buffers) == 2  # the pre-activation and its gradient
    hycam.remove(model)
    assert all(ref() is None for ref in buffers)


def test_bfloat16_stays_close_to_float64():
    x, up = expert_major(tokens=32, rank=16), torch.randn(3, 48, 16, dtype=torch.float64) / 4
    bias, probs = torch.randn(3, 48, dtype=torch.float64), torch.softmax(torch.randn(32, 3, dtype=torch.float64), -1)
    grads = []
    for dtype in (torch.float64, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, up, bias, probs)]
        out = weighted_silu_sum(*leaves)
        out.backward(torch.ones_like(out))
        grads.append([out.detach().double()] + [leaf.grad.double() for leaf in leaves])
    for precise, low in zip(*grads):
        torch.testing.assert_close(low, precise, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", ["hycam", "full_spec", "spec_only", "authors"])
def test_nothing_of_size_experts_x_tokens_x_hidden_is_kept_for_backward(variant):
    low_rank = {} if variant == "full_spec" else {"rank": 8}
    cam = HyCAM(64, hycam.HyCAMConfig.variant(variant, num_specialized=4, init_std=0.1, **low_rank)).train()
    h = torch.randn(2, 64, 64, requires_grad=True)  # more tokens than rows in any weight
    saved = []

    def keep(tensor):  # counts the memory behind each saved tensor: an expanded view costs its source
        saved.append(tensor.untyped_storage().nbytes() // tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        cam(h)[0].sum().backward()
    assert saved and max(saved) < 4 * 2 * 64 * 64


def test_router_calls_outside_a_model_forward_are_not_recorded():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8))
    model.model.layers[0].self_attn.hycam_modules["default"](torch.randn(1, 3, 64))  # a stray call, outside a forward
    out = model(**padded_batch(batch=2, length=5), output_hycam_routing=True)
    assert out.hycam_router_logits.shape == (2, 2, 5, 5)


def test_training_under_cpu_autocast_runs():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3)).train()
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    b = model.model.layers[0].self_attn.hycam_modules["default"].B
    assert b.grad.dtype == torch.float32 and b.grad.abs().sum() > 0
