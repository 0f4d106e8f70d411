"""The tools that know peft's files: transformers' Trainer, TRL's SFTTrainer, lm-evaluation-harness."""

import pytest
import torch
from conftest import padded_batch, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hycam
from hycam.files import HYCAM_CONFIG, HYCAM_WEIGHTS


class Batches(torch.utils.data.Dataset):
    """Four padded rows, labels on the non-padding tokens."""

    def __init__(self):
        batch = padded_batch(batch=4)
        self.rows = [{**{k: v[i] for k, v in batch.items()},
                      "labels": batch["input_ids"][i].masked_fill(batch["attention_mask"][i] == 0, -100)}
                     for i in range(4)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_with_trainer(model, out):
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Batches())
    trainer.train()
    return trainer


def test_trainer_save_model_on_the_peft_model_writes_adapter_files_only(tmp_path):
    model = get_peft_model(tiny_model(), hycam.HyCAMConfig(rank=8))
    trainer = train_with_trainer(model, tmp_path / "run")
    trainer.save_model(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    names = hycam.hycam_parameters(model.get_base_model())  # peft's files drop the adapter name
    assert set(saved) == {f"base_model.model.{n}".replace(".hycam_modules.default.", ".hycam_modules.") for n in names}
    batch = padded_batch()
    restored = PeftModel.from_pretrained(tiny_model(), tmp_path / "out")
    assert torch.equal(restored(**batch).logits, model.eval()(**batch).logits)


def test_hycam_save_after_trainer_save_model_keeps_the_trainer_files(tmp_path):
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8))
    train_with_trainer(model, tmp_path / "run").save_model(tmp_path / "out")
    trainer_files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in trainer_files  # a full state dict, HyCAM's tensors among the backbone's
    batch = padded_batch()
    expected = model.eval()(**batch).logits
    from_full = hycam.load(tiny_model(), tmp_path / "out", config=hycam.HyCAMConfig(rank=8))
    assert torch.equal(from_full(**batch).logits, expected)
    hycam.save(model, tmp_path / "out")
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after.keys() == trainer_files.keys() | {HYCAM_CONFIG, HYCAM_WEIGHTS}
    assert all(after[name] == content for name, content in trainer_files.items())
    assert torch.equal(hycam.load(tiny_model(), tmp_path / "out")(**batch).logits, expected)


def test_sft_trainer_with_a_hycam_peft_config_trains_hycam_only(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=32)
    assert args.gradient_checkpointing  # TRL's default: the router must train under it too
    data = Dataset.from_dict({"text": ["Let's think step by step. The answer is"] * 6})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=hycam.HyCAMConfig(rank=8),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel) and peft_model.peft_config["default"].peft_type == "HYCAM"
    base = peft_model.get_base_model()
    moved = {n for n, p in base.named_parameters() if n not in before or not torch.equal(p, before[n])}
    trainable = set(hycam.trainable_parameters(base))
    assert moved <= trainable  # the backbone is untouched
    assert {n for n in trainable if n.endswith((".B", ".W_in"))} <= moved


@pytest.fixture
def tiny_adapter_dir(tiny_model_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           hycam.HyCAMConfig(rank=8, init_std=0.3))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_lm_eval_hflm_scores_with_the_hycam_adapter(tiny_model_dir, tiny_adapter_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    request = Instance(request_type="loglikelihood", doc={}, arguments=("Let's think", " step by step"), idx=0)
    lm = HFLM(pretrained=str(tiny_model_dir), peft=str(tiny_adapter_dir), device="cpu", batch_size=1,
              dtype="float32")
    (score, _), = lm.loglikelihood([request])
    context, continuation = lm._encode_pair(*request.arguments)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir).eval()
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0, len(context) - 1:]
    expected = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    assert score == pytest.approx(expected, abs=1e-4)
    plain = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1, dtype="float32")
    (plain_score, _), = plain.loglikelihood([request])
    assert abs(plain_score - score) > 1e-3  # the adapter was applied, not ignored
