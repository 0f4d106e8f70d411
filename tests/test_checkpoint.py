"""hycam.save / hycam.load: trained weights and config only, refused on any mismatch."""

import json

import pytest
import torch
from conftest import padded_batch, tiny_model
from safetensors.torch import load_file, save_file

import hycam
from hycam.checkpoint import staged_files
from hycam.files import HYCAM_CONFIG as CONFIG_NAME
from hycam.files import HYCAM_WEIGHTS as WEIGHTS_NAME

pytestmark = pytest.mark.fast


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
    names = {f"model.layers.{i}.self_attn.hycam_modules.default.{p}" for i in range(2)
             for p in ("W_in", "N", "B")}
    assert set(load_file(path / WEIGHTS_NAME)) == set(hycam.trainable_parameters(model)) == names
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert hycam.HyCAMConfig.from_dict(meta["hycam_config"]) == model.hycam_config
    assert meta["base_model"] == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}


def test_loading_into_another_size_or_family_fails(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"saved for another base model: hidden_size 64 \(this model: 32\)$"):
        hycam.load(tiny_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), path)
    with pytest.raises(ValueError, match=r"model_type 'llama' \(this model: 'qwen2'\)$"):
        hycam.load(tiny_model("qwen2"), path)


def test_loading_into_another_hycam_config_fails(trained):
    _, path = trained
    other = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=4, init_std=0.3))
    with pytest.raises(ValueError, match=r"a different HyCAM than this model's: rank: 8 vs 4 \(checkpoint vs model\)"):
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
    with pytest.raises(KeyboardInterrupt), staged_files(path) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(b"partial")
        raise KeyboardInterrupt
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_saving_into_a_directory_keeps_the_files_already_there(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("mine")
    hycam.save(hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", "sub", CONFIG_NAME, WEIGHTS_NAME])
    assert (tmp_path / "sub" / "notes.txt").read_text() == "mine"


def test_dot_and_tilde_paths_work(tmp_path, monkeypatch):
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    monkeypatch.chdir(tmp_path)
    hycam.save(model, ".")
    monkeypatch.setenv("HOME", str(tmp_path))
    batch = padded_batch()
    assert torch.equal(hycam.load(tiny_model(), "~")(**batch).logits, model(**batch).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, vars(model).get("forward"))


def _assert_unchanged(model, before, logits):
    params, flags, forward = _state(model)
    assert params.keys() == before[0].keys() and all(torch.equal(params[n], before[0][n]) for n in params)
    assert flags == before[1] and forward is before[2]
    assert torch.equal(model(**padded_batch()).logits, logits)


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "wrong shape", "bad json"])
def test_a_failed_load_leaves_the_model_as_it_was(trained, damage):
    _, path = trained
    weights = path / WEIGHTS_NAME
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "wrong shape":
        tensors = load_file(weights)
        tensors["model.layers.1.self_attn.hycam_modules.default.B"] = torch.zeros(5, 64, 7)
        save_file(tensors, weights)
    else:
        (path / CONFIG_NAME).write_text("{not json")
    model = tiny_model()
    model.model.layers[0].mlp.requires_grad_(False)  # flags that are not all alike
    before, logits = _state(model), model(**padded_batch()).logits
    with pytest.raises(ValueError) as err:
        hycam.load(model, path)
    assert (CONFIG_NAME if damage == "bad json" else WEIGHTS_NAME) in str(err.value)
    assert not hycam.is_applied(model)
    _assert_unchanged(model, before, logits)


def test_a_corrupt_file_is_named(trained):
    _, path = trained
    (path / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: not a readable safetensors file"):
        hycam.load(tiny_model(), path)


def test_a_failed_load_into_a_hycam_model_changes_no_weight(trained):
    _, path = trained
    tensors = load_file(path / WEIGHTS_NAME)
    tensors["model.layers.1.self_attn.hycam_modules.default.B"] = torch.zeros(5, 64, 7)
    save_file(tensors, path / WEIGHTS_NAME)
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    before, logits = _state(model), model(**padded_batch()).logits
    with pytest.raises(ValueError, match=r"default\.B has shape \(5, 64, 7\), the model \(5, 64, 8\)"):
        hycam.load(model, path)
    _assert_unchanged(model, before, logits)


@pytest.mark.parametrize("field, value", [("rank", 8.0), ("num_specialized", 2.5), ("hard_routing", "false"),
                                          ("balance_coef", "0.1")])
def test_a_checkpoint_with_a_mistyped_field_is_refused_naming_file_and_field(trained, field, value):
    _, path = trained
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["hycam_config"][field] = value
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: HyCAMConfig.{field} must be"):
        hycam.load(tiny_model(), path)


def test_a_trainer_full_state_dict_turns_back_into_hycam(tmp_path):
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    model.save_pretrained(tmp_path)  # what Trainer.save_model writes for a model that is not a PeftModel
    assert "model.layers.0.self_attn.hycam_modules.default.W_in" in load_file(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="full state dict, which does not record HyCAM's configuration"):
        hycam.load(tiny_model(), tmp_path)
    restored = hycam.load(tiny_model(), tmp_path, config=hycam.HyCAMConfig(rank=8))
    batch = padded_batch()
    assert torch.equal(restored(**batch).logits, model(**batch).logits)
