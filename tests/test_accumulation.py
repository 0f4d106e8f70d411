"""The balance term weighs exactly balance_coef per optimiser step with gradient accumulation, in every loop.

Each loop below takes one optimiser step of two micro-batches over identical rows, routing noise off and
HyCAM at its zero init: the task loss then gives the routers no gradient (every specialized CAM computes
SiLU(0) = 0), so the router's step gradient is the balance term's alone, and every micro-batch has the same
one. It must be 0.1 x one micro-batch's balance gradient, whoever computes the task loss.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import hycam
from hycam import cam

COEF = 0.1


@pytest.fixture(autouse=True)
def no_noise(monkeypatch):
    """Deterministic routing in training too: every micro-batch routes alike."""
    route = cam.gumbel_route
    monkeypatch.setattr(cam, "gumbel_route", lambda logits, tau, noise, hard: route(logits, tau, False, hard))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a loop's own Accelerator must not outlive its test."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cams(model) -> list[cam.HyCAM]:
    return [module for module in model.modules() if isinstance(module, cam.HyCAM)]


def routers(model) -> torch.Tensor:
    return torch.cat([c.input_weights()[2].detach().flatten() for c in cams(model)])


def applied(model) -> torch.nn.Module:
    """The model HyCAM was applied to (a PeftModel's base model)."""
    return next(module for module in model.modules() if "hycam_config" in vars(module))


def rows(count: int = 4) -> list[dict]:
    ids = torch.tensor([5, 17, 42, 9, 77, 3, 64, 21])
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(count)]


def modulated() -> torch.nn.Module:
    torch.manual_seed(0)
    return hycam.apply(tiny_model(), hycam.HyCAMConfig(num_specialized=3, rank=4, balance_coef=COEF)).train()


def calls_of(model) -> list[dict]:
    """The keywords of every forward that `model` runs with gradients."""
    calls = []
    applied(model).register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(dict(kwargs)) if torch.is_grad_enabled() else None, with_kwargs=True)
    return calls


def one_balance_term(model, call: dict) -> torch.Tensor:
    """balance_coef x the routers' gradient of the balance loss of the micro-batch `call`, from `model`'s weights."""
    out = applied(model).train()(input_ids=call["input_ids"], attention_mask=call["attention_mask"])
    grads = torch.autograd.grad(out.balance_loss, [c.W_in for c in cams(model)])
    balance = torch.cat([g[-c.num_specialized:].flatten() for c, g in zip(cams(model), grads)])  # W_router's rows
    assert balance.abs().max() > 1e-4  # far above the tolerance: the term is there to be counted
    return COEF * balance


def assert_one_balance_term_per_step(before: torch.nn.Module, after: torch.nn.Module, call: dict) -> None:
    """`after` took one SGD step (lr 1) from `before`'s weights; `call` is one of the step's micro-batches."""
    torch.testing.assert_close(routers(before) - routers(after), one_balance_term(before, call), rtol=0.01, atol=1e-7)


def trainer_step(tmp_path, model, ranks: int = 1, **args) -> list[dict]:
    """One Trainer step of two micro-batches of two rows on each rank; the forwards' keywords."""
    from transformers import Trainer, TrainingArguments

    calls = calls_of(model)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                    report_to=[], use_cpu=True, save_strategy="no")
    loss_func = args.pop("compute_loss_func", None)
    Trainer(model=model, args=TrainingArguments(**settings, **args), train_dataset=rows(4 * ranks),
            compute_loss_func=loss_func).train()
    return calls


def summed_cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("loss", ["default", "label_smoothing", "compute_loss_func"])
def test_trainer_accumulating_two_micro_batches_weighs_the_balance_term_once(tmp_path, loss):
    args = {"default": {}, "label_smoothing": {"label_smoothing_factor": 0.1},
            "compute_loss_func": {"compute_loss_func": summed_cross_entropy}}[loss]
    model = modulated()
    before = copy.deepcopy(model)
    calls = trainer_step(tmp_path, model, **args)
    assert len(calls) == 2 and ("labels" in calls[0]) == (loss == "default")  # else Trainer keeps the labels
    assert_one_balance_term_per_step(before, model, calls[0])


def sft_step(tiny_model_dir, tmp_path, **trainer_args):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                     report_to=[], use_cpu=True, save_strategy="no", max_length=16, bf16=False)
    data = Dataset.from_dict({"text": ["Let's think step by step."] * 4})
    return SFTTrainer(args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                      **trainer_args)


def test_trl_sft_trainer_accumulating_weighs_the_balance_term_once(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = hycam.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        hycam.HyCAMConfig(num_specialized=3, rank=4, balance_coef=COEF)).train()
    before, calls = copy.deepcopy(model), calls_of(model)
    sft_step(tiny_model_dir, tmp_path, model=model).train()
    assert len(calls) == 2 and "num_items_in_batch" not in calls[0]  # TRL's fused-LM-head call
    assert_one_balance_term_per_step(before, model, calls[0])


def test_trl_sft_trainer_with_a_hycam_peft_config_weighs_the_balance_term_once(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = hycam.HyCAMConfig(num_specialized=3, rank=4, balance_coef=COEF)
    trainer = sft_step(tiny_model_dir, tmp_path, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       peft_config=config)
    # the same weights in a model of our own (a deep copy would keep the forward TRL binds on the model)
    before = hycam.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    before.load_state_dict({n: p.detach().clone() for n, p in hycam.hycam_parameters(applied(trainer.model)).items()},
                           strict=False)
    calls = calls_of(trainer.model)
    trainer.train()
    assert len(calls) == 2
    assert_one_balance_term_per_step(before, trainer.model, calls[0])


def test_an_accelerate_loop_accumulating_weighs_the_balance_term_once(fresh_accelerate_state):
    from accelerate import Accelerator

    model = modulated()
    before = copy.deepcopy(model)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(trainable, lr=1.0))
    batch = {k: torch.stack([row[k] for row in rows(2)]) for k in rows(1)[0]}
    for _ in range(2):
        with accelerator.accumulate(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            accelerator.backward(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()))
            optimizer.step()
            optimizer.zero_grad()
    assert_one_balance_term_per_step(before, model, batch)


def plain_accumulating_loop(model, steps: int = 2) -> None:
    batch = {k: torch.stack([row[k] for row in rows(2)]) for k in ("input_ids", "attention_mask")}
    for _ in range(steps):
        model(**batch).logits.float().logsumexp(-1).mean().backward()


def test_a_loop_that_accumulates_without_saying_so_is_warned_once_with_the_fix():
    model = modulated()
    with pytest.warns(UserWarning, match=r"hycam.set_gradient_accumulation\(model, steps\)") as caught:
        plain_accumulating_loop(model, steps=3)
    assert len([w for w in caught if "set_gradient_accumulation" in str(w.message)]) == 1


def test_a_declared_accumulation_is_not_warned_about():
    model = modulated()
    hycam.set_gradient_accumulation(model, 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*set_gradient_accumulation.*")
        plain_accumulating_loop(model)


def _two_rank_worker(rank: int, port: int, tmp_path, results) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    route = cam.gumbel_route
    cam.gumbel_route = lambda logits, tau, noise, hard: route(logits, tau, False, hard)
    torch.set_num_threads(1)
    model = modulated()
    before = routers(model)
    trainer_step(tmp_path / str(rank), model, ranks=2, label_smoothing_factor=0.1, ddp_backend="gloo")
    results.put((before - routers(model)).numpy())


def test_two_gloo_ranks_with_label_smoothing_weigh_the_balance_term_once(tmp_path):
    """Each rank: two micro-batches of two identical rows; DDP averages the two ranks' gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_two_rank_worker, args=(port, tmp_path, results), nprocs=2, start_method="spawn")
    expected = one_balance_term(modulated(), {k: v[None] for k, v in rows(1)[0].items()})
    for _ in range(2):
        torch.testing.assert_close(torch.from_numpy(results.get()), expected, rtol=0.01, atol=1e-7)
