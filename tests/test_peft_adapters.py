"""Several named HyCAM adapters on one model, as peft has them; switching HyCAM off; peft's state-dict views."""

import pytest
import torch
from conftest import REPO, padded_batch, tiny_model
from peft import PeftModel, convert_to_lora, get_base_model_state_dict, get_peft_model
from safetensors.torch import load_file

import hycam

pytestmark = pytest.mark.fast


def two_adapters():
    """Adapter "default" (5 experts, all layers) active, adapter "b" (3 experts, layer 1 only) added."""
    model = get_peft_model(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    model.add_adapter("b", hycam.HyCAMConfig(num_specialized=3, rank=4, layers=[1], balance_coef=0.5, init_std=0.3))
    return model


def logits(model, **kwargs):
    with torch.no_grad():
        return model.eval()(**padded_batch(), **kwargs).logits


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names_of(model, adapter: str) -> set[str]:
    return {f"base_model.model.{n}" for n in hycam.hycam_parameters(model.get_base_model(), adapter)}


def test_each_adapter_has_its_own_named_modules_and_only_the_active_one_trains():
    model = two_adapters()
    assert names_of(model, "b") == {f"base_model.model.model.layers.1.self_attn.hycam_modules.b.{p}"
                                    for p in ("W_in", "N", "B")}
    assert trainable(model) == names_of(model, "default")
    model.set_adapter("b")
    assert model.active_adapters == ["b"] and trainable(model) == names_of(model, "b")


def test_set_adapter_switches_what_the_forward_computes_and_routes():
    model = two_adapters()
    base = tiny_model()(**padded_batch()).logits
    first = logits(model, output_hycam_routing=True)
    model.set_adapter("b")
    out = model.train()(**padded_batch(), output_hycam_routing=True)
    assert out.hycam_router_logits.shape == (1, 3, 12, 3)  # b's one layer and three experts
    assert model.get_base_model().hycam_config.balance_coef == 0.5
    second = logits(model)
    assert not torch.allclose(second, first) and not torch.allclose(second, base)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)


def test_several_active_adapters_are_refused():
    model = two_adapters()
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "b"])


def test_save_selected_adapters_and_load_them_under_their_names(tmp_path):
    model = two_adapters()
    expected = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        expected[name] = logits(model)
    model.save_pretrained(tmp_path / "both")
    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert set(load_file(tmp_path / "both" / "b" / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.1.self_attn.hycam_modules.{p}" for p in ("W_in", "N", "B")}
    assert not (tmp_path / "only_b" / "adapter_model.safetensors").exists()
    restored = PeftModel.from_pretrained(tiny_model(), tmp_path / "both")
    restored.load_adapter(tmp_path / "only_b" / "b", adapter_name="b")
    assert torch.equal(logits(restored), expected["default"])
    restored.set_adapter("b")
    assert torch.equal(logits(restored), expected["b"])


def test_delete_adapter_activates_the_one_left_and_the_last_gives_the_backbone_back():
    model = two_adapters()
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapters == ["default"] and "b" not in model.peft_config
    assert not any(".hycam_modules.b." in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), logits(get_peft_model(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))))
    model.delete_adapter("default")
    assert model.active_adapters == [] and not hycam.is_applied(model.base_model.model)
    assert torch.equal(model.base_model(**padded_batch()).logits, tiny_model()(**padded_batch()).logits)


def test_a_v0_1_adapter_loads_as_a_second_adapter():
    old = REPO / "tests" / "fixtures" / "v0.1" / "peft"
    from test_legacy import base_model, logits as fixture_logits

    model = get_peft_model(base_model(), hycam.HyCAMConfig.from_pretrained(old))
    model.load_adapter(old, adapter_name="old")
    model.set_adapter("old")
    want = load_file(REPO / "tests" / "fixtures" / "v0.1" / "expected.safetensors")["logits_peft"]
    torch.testing.assert_close(fixture_logits(model), want, atol=1e-5, rtol=0)


def test_disable_adapter_gives_the_base_logits_exactly_and_keeps_every_weight():
    model = two_adapters()
    base = tiny_model()(**padded_batch()).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with_hycam = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
        assert torch.equal(model.train()(**padded_batch()).logits, base)  # training mode too: routing noise unused
    assert torch.equal(logits(model), with_hycam)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_peft_sees_hycam_layers_and_a_base_state_dict_without_them():
    model = two_adapters()
    status = model.get_layer_status()
    assert [s.name for s in status] == [f"model.model.layers.{i}.self_attn.hycam_modules" for i in range(2)]
    assert status[1].available_adapters == ["b", "default"] and status[1].active_adapters == ["default"]
    assert get_base_model_state_dict(model).keys() == tiny_model().state_dict().keys()
    assert model.supports_lora_conversion() is False
    with pytest.raises(TypeError, match="do not support LoRA conversion: .*HyCAMLayer"):
        convert_to_lora(model, rank=4)


def test_init_weights_false_is_hycams_non_identity_init():
    config = hycam.HyCAMConfig(rank=8, init_weights=False)
    assert config.init_std > 0 and "init_weights" not in config.to_dict()
    assert not torch.allclose(logits(get_peft_model(tiny_model(), config)), tiny_model()(**padded_batch()).logits)
