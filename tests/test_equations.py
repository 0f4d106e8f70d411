"""HyCAM computes the paper's equations (Eq. 7-11, 14), checked against explicit per-expert loops."""

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_model

import hycam
from hycam.fusion import weighted_silu_sum


def reference_fusion(cam, h, tau):
    """A_fusion written out from the paper, one expert at a time, with deterministic routing."""
    a_shared = F.silu(h @ cam.shared.weight.T)
    logits = h @ cam.router.weight.T
    p = torch.softmax(logits / tau, dim=-1)
    a = cam.spec_down.down.weight.view(cam.spec_up.size(0), -1, h.size(-1))
    fusion = a_shared
    for k in range(cam.spec_up.size(0)):
        w_spec = cam.spec_up[k] @ cam.spec_down.mix[k] @ a[k]  # B_k N_k A_k: d x d
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


def test_fusion_equals_the_paper_formula():
    model = hycam.apply(tiny_model(dtype=torch.float64), hycam.HyCAMConfig(rank=8, tau=0.7, init_std=0.3))
    cam = model.model.layers[0].self_attn.hycam
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    torch.testing.assert_close(cam(h), reference_fusion(cam, h, tau=0.7))


@pytest.mark.parametrize("modulate", ["attention", "residual"])
def test_modulation_applies_where_the_option_says(modulate):
    model = tiny_model(dtype=torch.float64)
    layer, seen = captured_layer(model)  # hooks registered before HyCAM's see the original h_att
    hycam.apply(model, hycam.HyCAMConfig(rank=8, init_std=0.3, modulate=modulate))
    model(**padded_batch())
    fusion = layer.self_attn.hycam(seen["h_norm"])
    h_in, h_att = seen["h_in"], seen["h_att"]
    if modulate == "attention":  # h_out = h_att + h_att * A, then the residual add
        expected = h_in + h_att + h_att * fusion
    else:  # the authors' code: (residual + h_att) * (1 + A)
        expected = (h_in + h_att) * (1 + fusion)
    torch.testing.assert_close(seen["h_sum"], expected, equal_nan=True)  # eager float64 pads are NaN


def test_lora_alpha_scales_the_specialized_pre_activation():
    config = hycam.HyCAMConfig(rank=8, init_std=0.3, shared=False, lora_alpha=32.0)
    cam = hycam.apply(tiny_model(dtype=torch.float64), config).model.layers[0].self_attn.hycam
    h = torch.randn(1, 3, 64, dtype=torch.float64)
    unscaled = cam.specialized_modulation(h)
    cam.scale = 1.0
    cam.spec_down.mix.data *= 32.0 / 8  # the same scale folded into N_k
    torch.testing.assert_close(unscaled, cam.specialized_modulation(h))


def test_weighted_silu_sum_gradients_match_autograd():
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_silu_sum, (x, up, bias, probs))
    assert torch.autograd.gradcheck(weighted_silu_sum, (x, up, None, probs))


def test_weighted_silu_sum_value():
    x, up, probs = torch.randn(2, 5, 3, 4), torch.randn(3, 6, 4), torch.rand(2, 5, 3)
    expected = sum(probs[..., k : k + 1] * F.silu(x[..., k, :] @ up[k].T) for k in range(3))
    torch.testing.assert_close(weighted_silu_sum(x, up, None, probs), expected)
