"""HyCAM on bitsandbytes 4-bit (NF4, double quantisation) and 8-bit bases (bitsandbytes' CPU backend): apply,
train, save, load onto a fresh quantized base, the peft path, main.py / hycam-eval with --quantization, and the
benchmark of a 4-bit base against bf16."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, padded_batch

import hycam
from hycam.cam import HyCAM
from hycam.data.models import load_model
from hycam.evaluation.loading import load_model_for, read_checkpoint
from hycam.train import loop

bnb = pytest.importorskip("bitsandbytes")
QUANTIZED = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
CONFIG = hycam.HyCAMConfig(rank=8, num_specialized=3, init_std=0.3)


@pytest.fixture(params=sorted(QUANTIZED))
def quantization(request) -> str:
    return request.param


def quantized(directory, quantization: str, dtype=torch.bfloat16) -> torch.nn.Module:
    model = load_model(str(directory), dtype=dtype, quantization=quantization)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QUANTIZED[quantization])
    return model


def packed_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.is_floating_point()}


def train_steps(model, steps: int = 4) -> list[float]:
    batch = padded_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**padded_batch()).logits


def test_hycam_joins_a_quantized_base_in_the_models_dtype_and_trains_it_alone(tiny_model_dir, quantization):
    model = hycam.apply(quantized(tiny_model_dir, quantization), CONFIG)
    packed = packed_weights(model)
    assert {p.dtype for p in hycam.trainable_parameters(model).values()} == {torch.bfloat16}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(hycam.trainable_parameters(model))
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, packed[name]) for name, p in packed_weights(model).items())


def test_hycam_save_loads_onto_a_fresh_quantized_base(tiny_model_dir, quantization, tmp_path):
    model = hycam.apply(quantized(tiny_model_dir, quantization), CONFIG)
    train_steps(model, steps=1)
    hycam.save(model, tmp_path)
    restored = hycam.load(quantized(tiny_model_dir, quantization), tmp_path)
    assert torch.equal(logits(restored), logits(model))


def test_peft_trains_and_reloads_hycam_on_a_quantized_base(tiny_model_dir, quantization, tmp_path):
    import peft

    model = peft.get_peft_model(quantized(tiny_model_dir, quantization), CONFIG)
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    restored = peft.PeftModel.from_pretrained(quantized(tiny_model_dir, quantization), tmp_path)
    assert torch.equal(logits(restored), logits(model))


def test_main_py_trains_a_4bit_base_and_hycam_eval_rebuilds_it_4bit(tiny_model_dir, tmp_path):
    _, model = loop.main(["--model", str(tiny_model_dir), "--data", "synthetic", "--output_dir", str(tmp_path),
                          "--quantization", "4bit", "--bf16", "true", "--gradient_checkpointing", "true",
                          "--max_records_per_task", "3", "--max_length", "256", "--rank", "8", "--num_specialized",
                          "3", "--max_steps", "2", "--eval_interval", "2", "--max_eval_records_per_task", "1"])
    assert json.loads((tmp_path / "last" / "method.json").read_text())["quantization"] == "4bit"
    cams = [m for m in model.modules() if isinstance(m, HyCAM)]
    assert cams and all(p.dtype == torch.bfloat16 for cam in cams for p in cam.parameters())
    rebuilt, _ = load_model_for(read_checkpoint(tmp_path / "last"), dtype=torch.bfloat16)
    assert isinstance(rebuilt.model.layers[0].self_attn.q_proj, QUANTIZED["4bit"])
    assert torch.equal(logits(rebuilt), logits(model))


def test_main_py_refuses_a_quantized_base_under_zero_3_in_one_line(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        loop.cli(["--model", str(tiny_model_dir), "--data", "synthetic", "--output_dir", str(tmp_path),
                  "--quantization", "8bit", "--zero_stage", "3", "--max_records_per_task", "3"])
    assert stop.value.code == 2
    assert "--quantization 8bit needs ZeRO stage 0-2" in capsys.readouterr().err


def test_the_quantized_benchmark_measures_both_bases_and_the_4bit_weights_are_smaller(tiny_model_dir, tmp_path):
    command = [sys.executable, "scripts/benchmark_quantized.py", "--model", str(tiny_model_dir), "--threads", "1",
               "--seq-len", "8", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    result = json.loads((tmp_path / "benchmark_quantized.json").read_text())
    assert sorted(result["bases"]) == ["4bit", "bf16"]
    assert all(row["step_s"] > 0 and row["peak_mb"] > 0 for row in result["bases"].values())
    # the linear layers' weights in 4 bits instead of 16; the embeddings, norms and HyCAM stay in bf16 (0.77 here)
    assert result["ratios"]["weights_mb"] < 0.85
    assert "| 4bit |" in (tmp_path / "benchmark_quantized.md").read_text()
