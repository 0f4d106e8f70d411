"""HyCAM as a peft method: get_peft_model, save_pretrained, from_pretrained, load_adapter, hycam.load."""

import json

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file

import hycam

pytestmark = pytest.mark.fast
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def trained_peft_model(family: str, steps: int = 3):
    model = get_peft_model(tiny_model(family), hycam.HyCAMConfig(num_specialized=3, rank=8)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = padded_batch()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_hycam_is_a_peft_type_after_import():
    assert PeftType("HYCAM") is PeftType.HYCAM and PeftType.HYCAM in list(PeftType)
    assert hycam.HyCAMConfig().peft_type is PeftType.HYCAM


def test_get_peft_model_trains_exactly_the_hycam_parameters(family):
    model = get_peft_model(tiny_model(family), hycam.HyCAMConfig(rank=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.{n}" for n in hycam.trainable_parameters(model.get_base_model())}
    assert trainable == expected and len(expected) == 2 * 3  # W_in (W_shared, A, W_router), N, B in each of 2 layers


def test_the_peft_model_output_carries_the_balance_loss_and_router_outputs():
    model = get_peft_model(tiny_model(), hycam.HyCAMConfig(num_specialized=4, rank=8, balance_coef=0.3)).train()
    batch = padded_batch(batch=3, length=12)
    out = model(**batch, labels=batch["input_ids"], output_hycam_routing=True)
    assert out.hycam_router_logits.shape == out.hycam_router_probs.shape == (2, 3, 12, 4)
    assert out.balance_loss.item() > 0  # its gradient reaches the router through out.loss (tests/test_harness.py)


def test_save_pretrained_writes_the_hycam_tensors_only(tmp_path):
    model = trained_peft_model("llama")
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # peft's rule: the model's names, the adapter name taken out (as LoRA's `lora_A.weight`)
    assert set(saved) == {f"base_model.model.model.layers.{i}.self_attn.hycam_modules.{p}" for i in range(2)
                          for p in ("W_in", "N", "B")}
    assert {n.replace(".hycam_modules.", ".hycam_modules.default.") for n in saved} == {
        f"base_model.model.{n}" for n in hycam.hycam_parameters(model.get_base_model())}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYCAM" and config["rank"] == 8 and config["num_specialized"] == 3


def test_from_pretrained_load_adapter_and_hycam_load_restore_identical_logits(family, tmp_path):
    model = trained_peft_model(family)
    model.save_pretrained(tmp_path)
    batch = padded_batch()
    expected = model(**batch).logits
    assert not torch.allclose(expected, tiny_model(family)(**batch).logits)  # training changed something
    restored = PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    assert torch.equal(restored(**batch).logits, expected)
    assert not any(p.requires_grad for p in restored.parameters())  # from_pretrained: inference mode
    base = tiny_model(family)
    base.load_adapter(str(tmp_path))
    assert torch.equal(base(**batch).logits, expected)
    assert torch.equal(hycam.load(tiny_model(family), tmp_path)(**batch).logits, expected)


def test_an_adapter_saved_under_one_name_loads_under_another(tmp_path):
    model = get_peft_model(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3), adapter_name="mine")
    assert all(".hycam_modules.mine." in n for n in hycam.hycam_parameters(model.get_base_model()))
    model.save_pretrained(tmp_path)
    batch = padded_batch()
    expected = model.eval()(**batch).logits
    restored = PeftModel.from_pretrained(tiny_model(), tmp_path / "mine")  # peft's folder of a named adapter
    assert torch.equal(restored(**batch).logits, expected)
    assert torch.equal(hycam.load(tiny_model(), tmp_path / "mine")(**batch).logits, expected)


def test_from_pretrained_trainable_trains_hycam_again(tmp_path):
    trained_peft_model("llama", steps=1).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}" for n in hycam.trainable_parameters(model.get_base_model())}


def test_an_adapter_for_another_size_is_refused_by_name(tmp_path):
    trained_peft_model("llama", steps=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"the HyCAM adapter does not match this model: missing \[.*layers\.2\."):
        PeftModel.from_pretrained(tiny_model(num_hidden_layers=3), tmp_path)


def test_unload_gives_back_the_backbone_without_peft_config():
    base = tiny_model()
    batch = padded_batch()
    before = base(**batch).logits
    model = get_peft_model(base, hycam.HyCAMConfig(rank=8, init_std=0.5))
    unloaded = model.unload()
    assert torch.equal(unloaded(**batch).logits, before)
    assert not hasattr(unloaded, "peft_config") and not hycam.is_applied(unloaded)


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merging_is_refused(call):
    model = get_peft_model(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.5))
    with pytest.raises(ValueError, match="cannot be merged into the weights: .* not linear in h_norm"):
        getattr(model, call)()


def test_hycam_on_a_lora_model_keeps_lora_trainable_and_remove_restores_its_flags():
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    hycam.apply(model, hycam.HyCAMConfig(rank=8))
    hycam_names = set(hycam.trainable_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora | hycam_names
    batch = padded_batch()
    model.train()(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in lora | hycam_names)
    hycam.remove(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora and len(lora) == 2 * 2 * 2


def test_lora_all_linear_on_a_hycam_model_leaves_hycam_layers_alone():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    out = model(**padded_batch(), output_hycam_routing=True)
    assert out.hycam_router_logits.shape == (2, 3, 12, 5)


def test_the_readme_peft_example_runs(tmp_path, monkeypatch):
    import re

    from conftest import REPO

    block = re.search(r"### As a peft method\n.*?```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    ids = scope["ids"]
    expected = scope["model"].eval()(input_ids=ids).logits
    assert torch.equal(scope["restored"](input_ids=ids).logits, expected)
    assert torch.equal(scope["also"](input_ids=ids).logits, expected)
