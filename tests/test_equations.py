"""HyCAM computes the paper's equations (Eq. 7-11, 14), checked against explicit per-expert loops."""

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_model

import hycam
from hycam.fast import weighted_silu_sum

pytestmark = pytest.mark.fast


def cam_of(model, layer=0):
    return model.model.layers[layer].self_attn.hycam_modules["default"]


def per_expert_fusion(cam, h, tau):
    """A_fusion written out from the paper, one expert at a time, with deterministic routing."""
    n = cam.B.size(0)
    w_shared, a, w_router = cam.W_in.detach().split([h.size(-1), n * cam.rank, n])  # W_in's rows in order
    a_shared = F.silu(h @ w_shared.T)
    p = torch.softmax(h @ w_router.T / tau, dim=-1)
    a = a.view(n, -1, h.size(-1))
    fusion = a_shared
    for k in range(n):
        w_spec = cam.B[k] @ cam.N[k] @ a[k]  # B_k N_k A_k: d x d
        fusion = fusion + p[..., k : k + 1] * F.silu(h @ w_spec.T)
    return fusion


def captured_layer(model, layer_index=0):
    """Records h_in, h_norm, h_att (before HyCAM) and residual + h_out of one layer."""
    layer, seen = model.model.layers[layer_index], {}
    layer.register_forward_pre_hook(lambda m, a, k: seen.update(h_in=k.get("hidden_states", a[0] if a else None)),
                                    with_kwargs=True)
    layer.self_attn.register_forward_hook(
        lambda m, a, k, out: seen.update(h_norm=k["hidden_states"], h_att=out[0]), with_kwargs=True)
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(h_sum=a[0]))
    return layer, seen


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_fusion_equals_the_paper_formula(path):
    model = hycam.apply(tiny_model(dtype=torch.float64), hycam.HyCAMConfig(rank=8, tau=0.7, init_std=0.3))
    cam = cam_of(model)
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    fusion, logits, probs = cam.reference_forward(h) if path == "reference" else cam(h)
    torch.testing.assert_close(fusion, per_expert_fusion(cam, h, tau=0.7))
    torch.testing.assert_close(logits, h @ cam.W_in[-cam.num_specialized:].T)  # Eq. 9: W_router, W_in's last rows
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, dim=-1))  # eval: no Gumbel noise


@pytest.mark.parametrize("modulate", ["attention", "residual"])
def test_modulation_applies_where_the_option_says(modulate):
    model = tiny_model(dtype=torch.float64)
    layer, seen = captured_layer(model)  # hooks registered before HyCAM's see the original h_att
    hycam.apply(model, hycam.HyCAMConfig(rank=8, init_std=0.3, modulate=modulate))
    model(**padded_batch())
    fusion = layer.self_attn.hycam_modules["default"](seen["h_norm"])[0]
    h_in, h_att = seen["h_in"], seen["h_att"]
    if modulate == "attention":  # h_out = h_att + h_att * A, then the residual add
        expected = h_in + h_att + h_att * fusion
    else:  # the authors' code: (residual + h_att) * (1 + A)
        expected = (h_in + h_att) * (1 + fusion)
    torch.testing.assert_close(seen["h_sum"], expected, equal_nan=True)  # eager float64 pads are NaN


def test_lora_alpha_scales_the_specialized_pre_activation():
    config = hycam.HyCAMConfig(rank=8, init_std=0.3, shared=False, lora_alpha=32.0)
    cam = cam_of(hycam.apply(tiny_model(dtype=torch.float64), config))
    h = torch.randn(1, 3, 64, dtype=torch.float64)
    scaled = [cam(h)[0], cam.reference_forward(h)[0]]
    cam.scale = 1.0
    cam.N.data *= 32.0 / 8  # the same scale folded into N_k
    torch.testing.assert_close(scaled, [cam(h)[0], cam.reference_forward(h)[0]])


def test_weighted_silu_sum_gradients_match_autograd():
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_silu_sum, (x, up, bias, probs))
    assert torch.autograd.gradcheck(weighted_silu_sum, (x, up, None, probs))


def test_weighted_silu_sum_value():
    x, up, probs = torch.randn(10, 3, 4), torch.randn(3, 6, 4), torch.rand(10, 3)
    expected = sum(probs[..., k : k + 1] * F.silu(x[..., k, :] @ up[k].T) for k in range(3))
    torch.testing.assert_close(weighted_silu_sum(x, up, None, probs), expected)
