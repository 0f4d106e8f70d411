"""The balance loss inside other people's training loops: an external cross-entropy, transformers' Trainer
(gradient accumulation, evaluation), two data-parallel ranks, TRL's SFTTrainer."""

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, router_grad, tiny_model

import hycam
from hycam import cam


@pytest.fixture
def no_noise(monkeypatch):
    """Deterministic routing in training too, so that runs batched differently see the same probabilities."""
    route = cam.gumbel_route
    monkeypatch.setattr(cam, "gumbel_route", lambda logits, tau, noise, hard: route(logits, tau, False, hard))


def modulated(coef=0.1, **config):
    return hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3, balance_coef=coef, **config)).train()


def cams(model) -> list[cam.HyCAM]:
    return [layer.self_attn.hycam_modules["default"] for layer in model.model.layers]


def router_grads(model) -> torch.Tensor:
    return torch.cat([router_grad(c).flatten() for c in cams(model)])


def routers(model) -> list[torch.Tensor]:
    """Each layer's W_router: the last N_s rows of its W_in."""
    return [c.input_weights()[2] for c in cams(model)]


def router_rows(grads: tuple[torch.Tensor, ...], model) -> torch.Tensor:
    """The W_router rows of gradients with respect to each layer's W_in."""
    return torch.cat([g[-c.num_specialized:].flatten() for g, c in zip(grads, cams(model))])


def labelled(batch):
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def test_an_external_cross_entropy_gives_the_routers_the_gradient_of_out_loss():
    batch = labelled(padded_batch())
    inside = modulated()
    torch.manual_seed(3)
    inside(**batch).loss.backward()
    outside = modulated()
    torch.manual_seed(3)
    logits = outside(**batch).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100).backward()
    torch.testing.assert_close(router_grads(outside), router_grads(inside))


def test_the_routers_gradient_is_the_task_loss_plus_balance_coef_times_the_balance_loss():
    batch = labelled(padded_batch())
    attached = modulated(coef=0.3)
    torch.manual_seed(3)
    attached(**batch).loss.backward()
    by_hand = modulated(coef=0.0)
    torch.manual_seed(3)
    out = by_hand(**batch)
    (out.loss + 0.3 * out.balance_loss).backward()
    torch.testing.assert_close(router_grads(attached), router_grads(by_hand))


def test_set_gradient_accumulation_weighs_each_forward_by_one_over_the_steps():
    batch = padded_batch()
    model = modulated(coef=0.4)
    hycam.set_gradient_accumulation(model, 4)
    torch.manual_seed(3)
    model(**batch).logits.sum().backward()
    by_hand = modulated(coef=0.0)
    torch.manual_seed(3)
    out = by_hand(**batch)
    (out.logits.sum() + 0.1 * out.balance_loss).backward()
    torch.testing.assert_close(router_grads(model), router_grads(by_hand))
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        hycam.set_gradient_accumulation(model, 0)


def test_with_num_items_in_batch_a_forward_carries_its_share_of_the_steps_target_tokens():
    batch = labelled(padded_batch())
    count = int(batch["labels"][:, 1:].ne(-100).sum())  # 29 of the step's 50
    model = modulated(coef=0.4)
    torch.manual_seed(3)
    model(**batch, num_items_in_batch=torch.tensor(50)).logits.sum().backward()
    by_hand = modulated(coef=0.0)
    torch.manual_seed(3)
    out = by_hand(**batch)
    (out.logits.sum() + 0.4 * count / 50 * out.balance_loss).backward()
    torch.testing.assert_close(router_grads(model), router_grads(by_hand))


def rows() -> list[dict]:
    """Four rows, the last two a copy of the first two: two micro-batches of two see what one batch of four sees."""
    batch = labelled(padded_batch(batch=2, length=10))
    return [{k: v[i] for k, v in batch.items()} for i in (0, 1, 0, 1)]


def trainer_update(tmp_path, micro_batch: int, accumulation: int, coef: float = 0.1, scope: str = "local",
                   **args) -> torch.Tensor:
    """The routers' change after one SGD step (lr 1: minus the gradient) of Trainer over `rows()` in order."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class InOrder(Trainer):
        def _get_train_sampler(self, *_):
            return SequentialSampler(self.train_dataset)

    model = modulated(coef=coef, balance_scope=scope)
    before = torch.cat([router.detach().flatten() for router in routers(model)])
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=micro_batch, max_steps=1,
                    gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd", max_grad_norm=0.0,
                    lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", seed=0)
    InOrder(model=model, args=TrainingArguments(**{**settings, **args}), train_dataset=rows()).train()
    return torch.cat([router.detach().flatten() for router in routers(model)]) - before


def test_trainer_accumulating_two_micro_batches_updates_the_routers_as_one_batch(tmp_path, no_noise):
    whole = trainer_update(tmp_path, micro_batch=4, accumulation=1)
    accumulated = trainer_update(tmp_path, micro_batch=2, accumulation=2)
    torch.testing.assert_close(accumulated, whole)
    assert not torch.allclose(trainer_update(tmp_path, micro_batch=4, accumulation=1, coef=0.0), whole)


def test_trainer_eval_loss_is_the_task_loss_and_predictions_are_the_logits(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = modulated().eval()
    data = rows()
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    with torch.no_grad():
        task = model(**batch).loss.item()
    seen = {}

    def metrics(prediction):
        seen["predictions"] = prediction.predictions
        return {}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    result = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=metrics).evaluate()
    assert result["eval_loss"] == pytest.approx(task, rel=1e-6)
    assert seen["predictions"].shape == (4, 10, 128)  # the logits alone: no router outputs, no balance loss


def _two_rank_worker(rank: int, port: int, tmp_path, results) -> None:
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    route = cam.gumbel_route
    cam.gumbel_route = lambda logits, tau, noise, hard: route(logits, tau, False, hard)
    torch.set_num_threads(1)
    local = trainer_update(tmp_path / str(rank), micro_batch=2, accumulation=1, ddp_backend="gloo")
    shared = trainer_update(tmp_path / str(rank), micro_batch=1, accumulation=2, scope="global", ddp_backend="gloo")
    results.put((rank, local.numpy(), shared.numpy()))


def test_two_gloo_ranks_accumulating_update_the_routers_as_one_batch(tmp_path, no_noise):
    """Local scope, one micro-batch of two rows per rank: rows 0, 1 and rows 2, 3 (the same two). Global scope,
    two micro-batches of one row per rank: rows 0 and 1 together, then rows 2 and 3 together."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_two_rank_worker, args=(port, tmp_path, results), nprocs=2, start_method="spawn")
    updates = [torch.from_numpy(update) for result in (results.get() for _ in range(2)) for update in result[1:]]
    whole = trainer_update(tmp_path, micro_batch=4, accumulation=1)
    for update in updates:
        torch.testing.assert_close(update, whole)


def test_trl_sft_trainer_trains_the_router_with_the_balance_term(tiny_model_dir, tmp_path, no_noise):
    """SFTTrainer computes its loss from the fused LM head's log-probabilities, not from `out.loss`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    def model_with_hycam(coef):
        torch.manual_seed(0)
        config = hycam.HyCAMConfig(rank=8, init_std=0.3, balance_coef=coef)
        return hycam.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).train()

    model, calls = model_with_hycam(0.1), []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)) if torch.is_grad_enabled() else None,
                                    with_kwargs=True)
    before = torch.cat([router.detach().flatten() for router in routers(model)])
    texts = ["Let's think step by step.", "The answer is", "Let's think. The answer is step", "step by step"]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1.0,
                     optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                     save_strategy="no", max_length=32, bf16=False)  # fp32: compared with an fp32 reference
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
               processing_class=AutoTokenizer.from_pretrained(tiny_model_dir)).train()
    after = torch.cat([router.detach().flatten() for router in routers(model)])
    (call,) = calls
    assert call.pop("fused_lm_head") is True
    reference = model_with_hycam(0.0)
    out = reference(**call)
    weights = [c.W_in for c in cams(reference)]
    task_grad = router_rows(torch.autograd.grad(out.loss, weights, retain_graph=True), reference)
    balance_grad = router_rows(torch.autograd.grad(out.balance_loss, weights), reference)
    torch.testing.assert_close(before - after, task_grad + 0.1 * balance_grad)
    assert (0.1 * balance_grad).abs().max() > 100 * 1e-5  # the balance term is far above the tolerance
