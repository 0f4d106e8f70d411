"""Files written by hycam 0.1.0 (`tests/fixtures/v0.1`, old parameter names) load and compute what they did."""

import json

import pytest
import torch
from conftest import REPO
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hycam
from hycam import legacy

pytestmark = pytest.mark.fast
FIXTURES = REPO / "tests" / "fixtures" / "v0.1"
FOLDERS = ("hycam", "inverse_peft", "full_spec", "authors", "peft")


def base_model():
    return AutoModelForCausalLM.from_pretrained(FIXTURES / "base", attn_implementation="eager").eval()


def logits(model) -> torch.Tensor:
    expected = load_file(FIXTURES / "expected.safetensors")
    with torch.no_grad():
        return model.eval()(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits


@pytest.mark.parametrize("folder", FOLDERS)
def test_hycam_load_of_a_v0_1_file_gives_its_logits(folder):
    model = hycam.load(base_model(), FIXTURES / folder)
    want = load_file(FIXTURES / "expected.safetensors")[f"logits_{folder}"]
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_peft_from_pretrained_of_a_v0_1_adapter_gives_its_logits():
    model = PeftModel.from_pretrained(base_model(), FIXTURES / "peft")
    want = load_file(FIXTURES / "expected.safetensors")["logits_peft"]
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_a_v0_1_full_state_dict_loads_with_its_config(tmp_path):
    """Trainer.save_model of a 0.1 HyCAM model: the backbone's tensors and HyCAM's under their old names."""
    meta = json.loads((FIXTURES / "hycam" / "hycam_config.json").read_text())
    config = hycam.HyCAMConfig.from_dict(meta["hycam_config"])
    full = {**base_model().state_dict(), **load_file(FIXTURES / "hycam" / "hycam_model.safetensors")}
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "model.safetensors")
    model = hycam.load(base_model(), tmp_path, config=config)
    want = load_file(FIXTURES / "expected.safetensors")["logits_hycam"]
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


def test_old_names_map_to_the_new_with_w_in_stacked_in_its_row_order():
    old = {"m.0.self_attn.hycam.shared.weight": torch.zeros(4, 4), "m.0.self_attn.hycam.spec_down.down.weight":
           torch.ones(6, 4), "m.0.self_attn.hycam.spec_down.mix": torch.ones(3, 2, 2), "m.0.mlp.weight": torch.ones(1)}
    new = legacy.upgrade(old)
    assert set(new) == {"m.0.self_attn.hycam_modules.W_in", "m.0.self_attn.hycam_modules.N", "m.0.mlp.weight"}
    assert torch.equal(new["m.0.self_attn.hycam_modules.W_in"], torch.cat([torch.zeros(4, 4), torch.ones(6, 4)]))
