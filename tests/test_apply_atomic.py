"""A failed hycam.apply leaves the model exactly as it was: parameters, requires_grad flags, forward."""

import pytest
import torch
from conftest import padded_batch, tiny_model

import hycam
import hycam.balance

pytestmark = pytest.mark.fast


def snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()}, dict(vars(model)).keys())


def assert_as_before(model, before, logits):
    params, flags, modules, attributes = snapshot(model)
    assert params.keys() == before[0].keys() and all(torch.equal(params[n], before[0][n]) for n in params)
    assert (flags, modules, attributes) == before[1:]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(**padded_batch()).logits, logits)


@pytest.fixture
def model():
    model = tiny_model()
    model.model.layers[1].mlp.requires_grad_(False)  # flags that are not all alike
    return model


def test_a_failure_while_building_the_cams_rolls_back(model):
    before, logits = snapshot(model), model(**padded_batch()).logits
    with pytest.raises(RuntimeError, match="std"):  # torch refuses a negative std in the first layer's init
        hycam.apply(model, hycam.HyCAMConfig(rank=8, init_std=-1.0))
    assert not hycam.is_applied(model)
    assert_as_before(model, before, logits)


def test_an_interrupt_after_every_layer_was_modulated_rolls_back(model, monkeypatch):
    install = hycam.balance.install

    def interrupted(*args):
        install(*args)
        raise KeyboardInterrupt  # Ctrl-C at the last step, once every layer and the model have their hooks

    monkeypatch.setattr(hycam.balance, "install", interrupted)
    before, logits = snapshot(model), model(**padded_batch()).logits
    with pytest.raises(KeyboardInterrupt):
        hycam.apply(model, hycam.HyCAMConfig(rank=8))
    assert_as_before(model, before, logits)


def test_a_refused_config_changes_nothing(model):
    before, logits = snapshot(model), model(**padded_batch()).logits
    with pytest.raises(ValueError, match="layers"):
        hycam.apply(model, hycam.HyCAMConfig(rank=8, layers=[0, 7]))
    assert_as_before(model, before, logits)
