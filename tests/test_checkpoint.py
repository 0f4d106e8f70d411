"""hycam.save / hycam.load: trained weights and config only, refused on any mismatch."""

import json

import pytest
import torch
from conftest import padded_batch, tiny_model
from safetensors.torch import load_file, save_file

import hycam
from hycam.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_directory


@pytest.fixture
def trained(tmp_path):
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    hycam.save(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_gives_identical_logits(trained):
    model, path = trained
    batch = padded_batch()
    restored = hycam.load(tiny_model(), path)
    assert torch.equal(restored(**batch).logits, model(**batch).logits)


def test_saves_exactly_the_hycam_tensors_and_config(trained):
    model, path = trained
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert set(load_file(path / WEIGHTS_NAME)) == set(hycam.trainable_parameters(model))
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert hycam.HyCAMConfig.from_dict(meta["hycam_config"]) == model.hycam_config
    assert meta["base_model"] == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}


def test_loading_into_another_size_or_family_fails(trained):
    _, path = trained
    with pytest.raises(ValueError, match="saved for base model"):
        hycam.load(tiny_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), path)
    with pytest.raises(ValueError, match="saved for base model"):
        hycam.load(tiny_model("qwen2"), path)


def test_loading_into_another_hycam_config_fails(trained):
    _, path = trained
    other = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=4))
    with pytest.raises(ValueError, match="holds HyCAM"):
        hycam.load(other, path)


def test_a_tampered_weights_file_fails_with_its_name(trained):
    _, path = trained
    tensors = load_file(path / WEIGHTS_NAME)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} does not match this model: missing"):
        hycam.load(tiny_model(), path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no HyCAM checkpoint"):
        hycam.load(tiny_model(), tmp_path)


def test_an_interrupted_save_keeps_the_previous_checkpoint(trained):
    _, path = trained
    before = (path / WEIGHTS_NAME).read_bytes()
    with pytest.raises(KeyboardInterrupt), atomic_directory(path) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(b"partial")
        raise KeyboardInterrupt
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
