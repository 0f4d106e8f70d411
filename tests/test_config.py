"""HyCAMConfig: field types are checked, in Python and from JSON; comparisons name the field."""

import json

import pytest
import torch
from conftest import padded_batch, tiny_model

import hycam

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("field, value, kind", [("rank", 8.0, "int or None"), ("num_specialized", 2.5, "int"),
                                                ("hard_routing", "false", "bool"), ("balance_coef", "0.1", "float"),
                                                ("tau", True, "float"), ("shared_rank", True, "int or None"),
                                                ("layers", [0, 1.0], "list[int] or None")])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(field, value, kind):
    with pytest.raises(TypeError) as err:
        hycam.HyCAMConfig(**{field: value})
    assert str(err.value) == f"HyCAMConfig.{field} must be {kind}, got {value!r} ({type(value).__name__})"


def test_ints_are_floats_and_tuples_are_lists():
    config = hycam.HyCAMConfig(tau=1, lora_alpha=32, layers=(0, 1))
    assert config.tau == 1 and config.layers == [0, 1] and config == hycam.HyCAMConfig(tau=1.0, lora_alpha=32.0,
                                                                                       layers=[0, 1])


def test_a_json_round_trip_gives_an_equal_config():
    config = hycam.HyCAMConfig.variant("authors", rank=8)
    assert hycam.HyCAMConfig.from_dict(json.loads(json.dumps(config.hycam_dict()))) == config
    assert hycam.HyCAMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # peft's form


def test_from_dict_refuses_unknown_and_mistyped_fields():
    with pytest.raises(ValueError, match="unknown HyCAMConfig fields: ranks"):
        hycam.HyCAMConfig.from_dict({"ranks": 8})
    with pytest.raises(TypeError, match="HyCAMConfig.rank must be int or None"):
        hycam.HyCAMConfig.from_dict({"rank": 8.0})


def test_differences_name_each_differing_field_and_ignore_peft_bookkeeping():
    ours = hycam.HyCAMConfig(rank=8, tau=0.5, base_model_name_or_path="a")
    theirs = hycam.HyCAMConfig(rank=4, tau=0.7, base_model_name_or_path="b")
    assert ours.differences(theirs) == ["rank: 8 vs 4", "tau: 0.5 vs 0.7"]
    assert ours == hycam.HyCAMConfig(rank=8, base_model_name_or_path="b")


def test_apply_refuses_a_config_of_another_kind():
    from peft import LoraConfig

    with pytest.raises(TypeError, match="hycam.apply needs a hycam.HyCAMConfig, got LoraConfig"):
        hycam.apply(tiny_model(), LoraConfig())


def test_init_std_draws_weights_only_and_does_not_stop_a_checkpoint_loading(tmp_path):
    assert hycam.HyCAMConfig(rank=8, init_std=0.3) == hycam.HyCAMConfig(rank=8)
    assert hycam.HyCAMConfig(rank=8, init_std=0.3).differences(hycam.HyCAMConfig(rank=4)) == ["rank: 8 vs 4"]
    saved = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    hycam.save(saved, tmp_path)
    loaded = hycam.load(hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8)), tmp_path)
    assert torch.equal(loaded(**padded_batch()).logits, saved(**padded_batch()).logits)
