"""Gumbel-softmax routing (Eq. 9) and the load-balancing loss (Eq. 10)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, router_grad, tiny_model

import hycam
from hycam import routing

pytestmark = pytest.mark.fast


def seed_readme_balance_loss(all_router_logits, all_gumbel_probs):
    """The authors' calculate_load_balancing_loss, as their README gives it."""
    n = all_router_logits.size(-1)
    softmax = F.softmax(all_router_logits.reshape(-1, n), dim=-1)
    mean_probs = torch.mean(all_gumbel_probs.reshape(-1, n), dim=0)
    mean_softmax = torch.mean(softmax, dim=0)
    return torch.sum(mean_probs * mean_softmax)


def test_balance_loss_equals_the_authors_formula():
    logits = torch.randn(3, 2, 6, 5)
    probs = torch.softmax(torch.randn(3, 2, 6, 5), -1)
    torch.testing.assert_close(hycam.load_balancing_loss(logits, probs), seed_readme_balance_loss(logits, probs))


def test_balance_loss_ignores_padding_tokens():
    logits, probs = torch.randn(3, 2, 6, 5), torch.softmax(torch.randn(3, 2, 6, 5), -1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :4] = 0
    keep = mask.bool()
    expected = seed_readme_balance_loss(logits[:, keep], probs[:, keep])
    torch.testing.assert_close(hycam.load_balancing_loss(logits, probs, mask), expected)


def test_model_balance_loss_is_the_formula_over_all_layers_and_real_tokens(family):
    model = hycam.apply(tiny_model(family), hycam.HyCAMConfig(rank=8)).train()
    batch = padded_batch()
    out = model(**batch, output_hycam_routing=True)
    keep = batch["attention_mask"].bool()
    expected = seed_readme_balance_loss(out.hycam_router_logits[:, keep], out.hycam_router_probs[:, keep])
    torch.testing.assert_close(out.balance_loss, expected)


def test_uniform_routing_gives_one_over_n():
    logits = torch.zeros(2, 4, 3, 5)
    assert abs(hycam.load_balancing_loss(logits, torch.softmax(logits, -1)).item() - 1 / 5) < 1e-6


def test_routing_without_noise_is_tempered_softmax():
    logits = torch.randn(4, 5)
    probs = hycam.gumbel_route(logits, tau=0.5, noise=False, hard=False)
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, -1))


def test_gumbel_noise_samples_the_softmax_distribution():
    # Gumbel-max: argmax(logits + g) is distributed as softmax(logits).
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    torch.manual_seed(0)
    probs = hycam.gumbel_route(logits.expand(40000, 4), tau=0.5, noise=True, hard=False)
    frequency = torch.bincount(probs.argmax(-1), minlength=4).float() / 40000
    torch.testing.assert_close(frequency, torch.softmax(logits, -1), atol=0.01, rtol=0)


def test_hard_routing_is_one_hot_with_the_soft_gradient():
    logits = torch.randn(6, 5, requires_grad=True)
    probs = hycam.gumbel_route(logits, tau=0.5, noise=False, hard=True)
    assert torch.equal(probs.detach().sum(-1), torch.ones(6)) and set(probs.detach().unique().tolist()) <= {0.0, 1.0}
    weights = torch.randn(6, 5)
    (probs * weights).sum().backward()
    soft = torch.softmax(logits.detach() / 0.5, -1)
    expected = soft * (weights - (soft * weights).sum(-1, keepdim=True)) / 0.5
    torch.testing.assert_close(logits.grad, expected)


def test_evaluation_is_deterministic_and_training_is_noisy():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    batch = padded_batch()
    assert torch.equal(model(**batch, output_hycam_routing=True).hycam_router_probs, model(**batch, output_hycam_routing=True).hycam_router_probs)
    model.train()
    assert not torch.equal(model(**batch, output_hycam_routing=True).hycam_router_probs, model(**batch, output_hycam_routing=True).hycam_router_probs)


def test_eval_noise_option_keeps_noise_at_evaluation():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, eval_noise=True))
    batch = padded_batch()
    assert not torch.equal(model(**batch, output_hycam_routing=True).hycam_router_probs, model(**batch, output_hycam_routing=True).hycam_router_probs)


def test_balance_loss_alone_trains_the_router():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8)).train()
    model(**padded_batch()).balance_loss.backward()
    grad = router_grad(model.model.layers[1].self_attn.hycam_modules["default"])
    assert grad is not None and grad.abs().sum() > 0


def _global_loss_worker(rank: int, port: int, logits, probs, mask, results) -> None:
    """One of two ranks: the global loss of its half of the batch, and the gradient of its logits."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = slice(rank * 2, rank * 2 + 2)
    mine = logits[:, half].clone().requires_grad_()
    loss = hycam.load_balancing_loss(mine, probs[:, half], mask[half], global_batch=True)
    loss.backward()
    results.put((rank, loss.item(), mine.grad.numpy()))  # numpy: sent by value, not as shared memory
    dist.destroy_process_group()


def test_global_balance_loss_over_two_ranks_is_the_whole_batch_loss():
    """Each rank's value is the loss of the whole batch; the ranks' gradients, averaged as data
    parallelism does, are the whole-batch loss's gradient."""
    import socket

    import torch.multiprocessing as mp
    logits, probs = torch.randn(3, 4, 6, 5, dtype=torch.float64), torch.softmax(torch.randn(3, 4, 6, 5), -1)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[3, :5] = 0  # the ranks hold different numbers of real tokens
    whole = logits.clone().requires_grad_()
    expected = hycam.load_balancing_loss(whole, probs.double(), mask)
    expected.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork would inherit any process group an earlier test left in this process.
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_global_loss_worker, args=(port, logits, probs.double(), mask, results), nprocs=2,
                       start_method="spawn")
    (_, loss_0, grad_0), (_, loss_1, grad_1) = sorted((results.get() for _ in range(2)), key=lambda r: r[0])
    assert loss_0 == pytest.approx(expected.item(), rel=1e-12) and loss_1 == pytest.approx(expected.item(), rel=1e-12)
    grads = torch.cat([torch.from_numpy(grad_0), torch.from_numpy(grad_1)], dim=1) / 2  # as DDP averages
    torch.testing.assert_close(grads, whole.grad)


def test_global_scope_communicates_in_training_only(monkeypatch):
    """Generation or validation may run on one rank alone: an all-reduce there would hang."""
    def all_reduce(_):
        raise AssertionError("all-reduce")
    monkeypatch.setattr(routing.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(routing, "_all_ranks_sum", all_reduce)
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, balance_scope="global"))
    with torch.no_grad():
        model.eval()(**padded_batch())
        with pytest.raises(AssertionError, match="all-reduce"):
            model.train()(**padded_batch())
