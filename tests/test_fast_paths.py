"""The speed paths of the specialized CAMs compute the same thing as the plain formulas."""

import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_model

import hycam
from hycam import fusion
from hycam.cam import HyCAM, LowRankDown
from hycam.fusion import weighted_silu_sum


def reference(x, up, bias, probs):
    """sum_k p_k SiLU(x_k B_k^T + b_k), one expert at a time."""
    terms = [F.silu(x[..., k, :] @ up[k].T + (0 if bias is None else bias[k])) for k in range(up.size(0))]
    return sum(probs[..., k : k + 1] * term for k, term in enumerate(terms))


def expert_major(tokens=6, experts=3, rank=4, dtype=torch.float64):
    """x as LowRankDown returns it: a (tokens, N_s, r) view of an (N_s, tokens, r) tensor."""
    return torch.randn(experts, tokens, rank, dtype=dtype).transpose(0, 1)


def test_low_rank_down_is_x_a_transposed_n_transposed():
    down = LowRankDown(8, rank=3, num=4).double()
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    a = down.down.weight.view(4, 3, 8)
    expected = torch.stack([h @ a[k].T @ down.mix[k].T for k in range(4)], dim=-2)  # (2, 5, 4, 3)
    torch.testing.assert_close(down(h), expected)


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
    fusion.release_workspace()  # earlier tests' buffers (other dtypes) are not this model's
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(init_std=0.02))
    model(**padded_batch()).logits.sum().backward()
    buffers = [weakref.ref(b) for b in vars(fusion._scratch)["buffers"].values()]
    assert len(buffers) == 2  # the pre-activation and its gradient
    hycam.remove(model)
    assert all(ref() is None for ref in buffers)


def test_inference_reads_the_three_input_weights_in_one_matmul():
    cam = HyCAM(16, hycam.HyCAMConfig(num_specialized=3, rank=4, init_std=0.1), dtype=torch.float64).eval()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert cam._merged_input_weight() is not None
        merged = cam(h)
    torch.testing.assert_close(merged, cam(h).detach())  # with grad enabled: three matmuls
    cam.float()  # new, separate weight tensors: inference falls back to three matmuls
    with torch.no_grad():
        assert cam._merged_input_weight() is None
        torch.testing.assert_close(cam(h.float()), merged.float())


def test_training_steps_and_checkpoint_loads_keep_the_one_matmul_inference():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.02))
    optimizer = torch.optim.AdamW(hycam.trainable_parameters(model).values(), lr=1e-2)
    model(**padded_batch()).logits.square().mean().backward()
    optimizer.step()
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert all(m._merged_input_weight() is not None for m in model.modules() if isinstance(m, HyCAM))


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
        cam(h).sum().backward()
    assert saved and max(saved) < 4 * 2 * 64 * 64


def test_router_calls_outside_a_model_forward_are_not_recorded():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8))
    model.model.layers[0].self_attn.hycam(torch.randn(1, 3, 64))  # a stray call, outside model.forward
    out = model(**padded_batch(batch=2, length=5), output_hycam_routing=True)
    assert out.hycam_router_logits.shape == (2, 2, 5, 5)


def test_training_under_cpu_autocast_runs():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3)).train()
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    spec_up = model.model.layers[0].self_attn.hycam.spec_up
    assert spec_up.grad.dtype == torch.float32 and spec_up.grad.abs().sum() > 0


def plain_fusion(cam, h):
    """Eq. 11 written out, one expert at a time, in float64: SiLU(h W_s^T) + sum_k p_k SiLU(s h (B_k N_k A_k)^T)."""
    w = {name: p.detach().double() for name, p in cam.named_parameters()}
    n, r = w["spec_up"].shape[0], w["spec_up"].shape[2]
    down, h = w["spec_down.down.weight"].view(n, r, -1), h.double()
    probs = torch.softmax(h @ w["router.weight"].T / cam.router.tau, dim=-1)
    experts = [F.silu(cam.scale * h @ (w["spec_up"][k] @ w["spec_down.mix"][k] @ down[k]).T) for k in range(n)]
    return F.silu(h @ w["shared.weight"].T) + sum(probs[..., k : k + 1] * e for k, e in enumerate(experts))


@pytest.mark.parametrize("lora_alpha", [None, 32.0])
@pytest.mark.parametrize("tokens", [1, 7])
def test_inference_matches_the_plain_formula_in_float64_and_bfloat16(lora_alpha, tokens):
    config = hycam.HyCAMConfig(num_specialized=3, rank=8, lora_alpha=lora_alpha, init_std=0.1)
    cam = HyCAM(32, config, dtype=torch.float64).eval()
    h = torch.randn(2, tokens, 32, dtype=torch.float64)
    with torch.no_grad():
        assert cam._merged_input_weight() is not None  # the one-matmul path is the one tested
        torch.testing.assert_close(cam(h), plain_fusion(cam, h), rtol=1e-12, atol=1e-12)
        low = HyCAM(32, config, dtype=torch.bfloat16).eval()
        low.load_state_dict(cam.state_dict())  # copies into the adjacent storage: the merged path stays
        assert low._merged_input_weight() is not None
        got = low(h.bfloat16()).double()
    want = plain_fusion(low, h.bfloat16())
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_inference_follows_weights_written_in_place_by_a_step_or_a_load():
    config = hycam.HyCAMConfig(num_specialized=3, rank=8, init_std=0.1)
    cam = HyCAM(32, config, dtype=torch.float64).eval()
    h = torch.randn(2, 3, 32, dtype=torch.float64)
    with torch.no_grad():
        before = cam(h)  # folds N_k into B_k
    cam(h).square().sum().backward()
    torch.optim.SGD(cam.parameters(), lr=0.5).step()
    with torch.no_grad():
        stepped = cam(h)
        assert not torch.allclose(stepped, before)
        torch.testing.assert_close(stepped, plain_fusion(cam, h), rtol=1e-12, atol=1e-12)
        torch.manual_seed(1)
        other = HyCAM(32, config, dtype=torch.float64)
        cam.load_state_dict(other.state_dict())
        torch.testing.assert_close(cam(h), plain_fusion(other, h), rtol=1e-12, atol=1e-12)
