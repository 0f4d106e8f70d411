"""hycam.apply / remove / trainable_parameters on tiny Llama, Qwen2 and Mistral models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_model

import hycam

pytestmark = pytest.mark.fast


def cam_of(model, layer=0):
    return model.model.layers[layer].self_attn.hycam_modules["default"]


def test_logits_unchanged_at_init(family):
    model, batch = tiny_model(family), padded_batch()
    before = model(**batch).logits
    hycam.apply(model, hycam.HyCAMConfig(rank=8))
    torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=0)


def test_trainable_set_is_exactly_the_hycam_parameters(family):
    model = hycam.apply(tiny_model(family), hycam.HyCAMConfig(rank=8))
    expected = {f"model.layers.{i}.self_attn.hycam_modules.default.{p}" for i in range(2)
                for p in ("W_in", "N", "B")}
    assert set(hycam.trainable_parameters(model)) == set(hycam.hycam_parameters(model)) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_parameter_shapes_follow_the_paper():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(num_specialized=3, rank=8))
    cam = cam_of(model)
    assert cam.W_in.shape == (64 + 3 * 8 + 3, 64)  # W_shared (d x d), A_1..A_3 (r x d each), W_router (N_s x d)
    w_shared, a, w_router = cam.input_weights()
    assert w_shared.shape == (64, 64) and a.shape == (3 * 8, 64) and w_router.shape == (3, 64)
    assert w_shared.data_ptr() == cam.W_in.data_ptr()  # views of the one parameter, no copy
    assert w_router.data_ptr() == cam.W_in[-3:].data_ptr() and cam.W_router is None
    assert cam.N.shape == (3, 8, 8)  # N_k: r x r
    assert cam.B.shape == (3, 64, 8)  # B_k: d x r


# Per variant (d = 64, N_s = 3, r = r_s = 8): every HyCAM parameter of a layer, its shape, and whether it trains.
VARIANT_PARAMETERS = {
    "hycam": {"W_in": ((91, 64), True), "N": ((3, 8, 8), True), "B": ((3, 64, 8), True)},
    "shared_only": {"W_in": ((64, 64), True)},
    "full_spec": {"W_in": ((67, 64), True), "B": ((3, 64, 64), True)},
    "spec_only": {"W_in": ((27, 64), True), "N": ((3, 8, 8), True), "B": ((3, 64, 8), True)},
    "inverse_peft": {"W_in": ((11, 64), True), "N_shared": ((8, 8), True), "B_shared": ((64, 8), True),
                     "B": ((3, 64, 64), True)},
    "authors": {"W_in": ((88, 64), True), "b_shared": ((64,), True), "W_router": ((3, 64), False),
                "b_router": ((3,), False), "N": ((3, 8, 8), True), "B": ((3, 64, 8), True), "b_spec": ((3, 64), True)},
}


@pytest.mark.parametrize("variant", sorted(VARIANT_PARAMETERS))
def test_each_variant_has_exactly_its_parameters_and_trains_them_by_its_config(variant):
    overrides = {"num_specialized": 3} if variant != "shared_only" else {}
    overrides |= {"shared_rank": 8} if variant == "inverse_peft" else {} if variant == "full_spec" else {"rank": 8}
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig.variant(variant, **overrides))
    expected = {f"model.layers.{i}.self_attn.hycam_modules.default.{name}": spec for i in range(2)
                for name, spec in VARIANT_PARAMETERS[variant].items()}
    if variant == "authors":  # train_layernorms
        expected |= {f"model.layers.{i}.{norm}.weight": ((64,), True) for i in range(2)
                     for norm in ("input_layernorm", "post_attention_layernorm")}
    params = hycam.hycam_parameters(model)
    assert {n: (tuple(p.shape), p.requires_grad) for n, p in params.items()} == expected
    trainable = {n for n, (_, trains) in expected.items() if trains}
    assert set(hycam.trainable_parameters(model)) == trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_backbone_gets_no_gradient(family):
    model = hycam.apply(tiny_model(family), hycam.HyCAMConfig(rank=8)).train()
    batch = padded_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    trainable = hycam.trainable_parameters(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None for p in trainable.values())


def test_output_shapes(family):
    model = hycam.apply(tiny_model(family), hycam.HyCAMConfig(num_specialized=4, rank=8))
    out = model(**padded_batch(batch=3, length=12), output_hycam_routing=True)
    assert out.hycam_router_logits.shape == out.hycam_router_probs.shape == (2, 3, 12, 4)
    assert out.balance_loss.shape == () and out.loss is None


def test_loss_is_the_task_loss_and_the_balance_loss_is_reported_beside_it():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, balance_coef=0.3)).train()
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, output_hycam_routing=True)
    shifted = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted)
    keep = batch["attention_mask"].bool()
    expected = hycam.load_balancing_loss(out.hycam_router_logits[:, keep], out.hycam_router_probs[:, keep])
    torch.testing.assert_close(out.balance_loss, expected)


def test_one_step_moves_shared_specialized_and_router_weights():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8)).train()
    before = {n: p.detach().clone() for n, p in hycam.trainable_parameters(model).items()}
    optimizer = torch.optim.AdamW(hycam.trainable_parameters(model).values(), lr=1e-3)
    batch = padded_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    moved = {n for n, p in hycam.trainable_parameters(model).items() if not torch.equal(p, before[n])}
    for part in ("W_in", "B"):
        assert {f"model.layers.{i}.self_attn.hycam_modules.default.{part}" for i in range(2)} <= moved
    for i in range(2):  # W_router: W_in's last rows
        name = f"model.layers.{i}.self_attn.hycam_modules.default.W_in"
        assert not torch.equal(hycam.trainable_parameters(model)[name][-3:], before[name][-3:])


def test_a_few_steps_lower_the_loss():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8)).train()
    optimizer = torch.optim.AdamW(hycam.trainable_parameters(model).values(), lr=1e-2)
    batch = padded_batch()
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # same Gumbel noise each step: the change is the training's
        loss = model(**batch, labels=batch["input_ids"]).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1


def test_remove_restores_the_backbone_exactly(family):
    model, batch = tiny_model(family), padded_batch()
    before = model(**batch).logits
    hycam.apply(model, hycam.HyCAMConfig(rank=8, init_std=0.5))
    assert not torch.allclose(model(**batch).logits, before)
    hycam.remove(model)
    assert torch.equal(model(**batch).logits, before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("hycam" in n for n in model.state_dict())


def test_backbone_parameter_names_do_not_change():
    model = tiny_model()
    names = set(model.state_dict())
    hycam.apply(model)
    assert {n for n in model.state_dict() if ".hycam_modules." not in n} == names


def test_deepcopy_is_independent():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.5))
    clone = copy.deepcopy(model)
    hycam.remove(clone)
    batch = padded_batch()
    assert model(**batch, output_hycam_routing=True).hycam_router_logits is not None
    assert "hycam_router_logits" not in clone(**batch)


def test_applying_twice_is_refused():
    model = hycam.apply(tiny_model())
    with pytest.raises(ValueError, match="already has HyCAM"):
        hycam.apply(model)


def test_a_model_without_decoder_layers_is_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no list of decoder layers with self_attn"):
        hycam.apply(model)


def test_layers_option_limits_injection():
    model = hycam.apply(tiny_model(num_hidden_layers=3), hycam.HyCAMConfig(rank=8, layers=[0, 2]))
    assert [hasattr(layer.self_attn, "hycam_modules") for layer in model.model.layers] == [True, False, True]
    assert model(**padded_batch(), output_hycam_routing=True).hycam_router_logits.shape[0] == 2
    with pytest.raises(ValueError, match="layers"):
        hycam.apply(tiny_model(), hycam.HyCAMConfig(layers=[5]))


def test_full_rank_specialized_cams_are_d_by_d():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig.variant("full_spec"))
    assert cam_of(model).B.shape == (5, 64, 64)


def test_authors_variant_trains_norms_and_not_the_router_but_saves_it():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig.variant("authors", rank=8))
    trainable, saved = set(hycam.trainable_parameters(model)), set(hycam.hycam_parameters(model))
    assert "model.layers.0.input_layernorm.weight" in trainable
    assert "model.layers.1.post_attention_layernorm.weight" in trainable
    assert "model.norm.weight" not in trainable
    assert saved - trainable == {f"model.layers.{i}.self_attn.hycam_modules.default.{p}" for i in range(2)
                                 for p in ("W_router", "b_router")}


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="tau"):
        hycam.HyCAMConfig(tau=0)
    with pytest.raises(ValueError, match="modulate"):
        hycam.HyCAMConfig(modulate="mlp")
    with pytest.raises(ValueError, match="unknown HyCAM variant"):
        hycam.HyCAMConfig.variant("nope")
