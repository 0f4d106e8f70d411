"""TRL's preference training with a HyCAM `peft_config`: the reference is the base model, through disable_adapter."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hycam


def test_dpo_trainer_trains_hycam_against_the_unchanging_base_model(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict({"prompt": ["Let's think"] * 4, "chosen": [" step by step."] * 4,
                              "rejected": [" The answer is"] * 4})
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, peft_config=hycam.HyCAMConfig(rank=8),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    reference_before = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    trainer.train()
    base = trainer.model.get_base_model()
    moved = {n for n, p in base.named_parameters() if n not in before or not torch.equal(p, before[n])}
    trainable = set(hycam.trainable_parameters(base))
    assert moved <= trainable and {n for n in trainable if n.endswith((".B", ".W_in"))} <= moved
    # HyCAM starts at its zero init, so the model is the base model then; its reference stays that while HyCAM trains
    assert torch.equal(torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), reference_before)
    assert trainer.state.log_history[0]["rewards/margins"] == 0 != trainer.state.log_history[1]["rewards/margins"]
