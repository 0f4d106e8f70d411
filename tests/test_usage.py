"""HyCAM stays correct under what users do with a model: generation with the KV cache, gradient
checkpointing, SDPA, bf16, mixed-length batches, evaluation under no_grad."""

import pytest
import torch
from conftest import padded_batch, router_grad, tiny_model

import hycam

pytestmark = pytest.mark.fast


def modulated(family="llama", **config):
    return hycam.apply(tiny_model(family), hycam.HyCAMConfig(rank=8, init_std=0.3, **config))


def test_generation_with_and_without_cache_gives_the_same_tokens(family):
    model = modulated(family)
    batch = padded_batch()
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**batch, use_cache=True, **settings)
    without = model.generate(**batch, use_cache=False, **settings)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] == batch["input_ids"].shape[1] + 8


def test_cached_decoding_matches_the_full_forward():
    model = modulated()
    ids = torch.randint(1, 128, (1, 9))
    full = model(input_ids=ids).logits[:, -1]
    past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
    step = model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True, output_hycam_routing=True)
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)
    assert step.hycam_router_logits.shape == (2, 1, 1, 5)


def losses_and_grads(model, batch):
    torch.manual_seed(7)  # the same Gumbel noise in both runs
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in hycam.trainable_parameters(model).items()}
    return out.loss.detach(), out.balance_loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    batch = padded_batch()
    plain = losses_and_grads(modulated(family).train(), batch)
    model = modulated(family).train()
    hycam.enable_checkpointing(model)
    checkpointed = losses_and_grads(model, batch)
    torch.testing.assert_close(checkpointed[:2], plain[:2])
    torch.testing.assert_close(checkpointed[2], plain[2])


def test_balance_loss_reaches_the_router_under_gradient_checkpointing():
    model = modulated().train()
    hycam.enable_checkpointing(model)
    model(**padded_batch()).balance_loss.backward()
    assert router_grad(model.model.layers[0].self_attn.hycam_modules["default"]).abs().sum() > 0


def test_reentrant_checkpointing_is_refused_with_the_fix_in_the_message():
    model = modulated().train()
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        model(**padded_batch())


def test_sdpa_and_eager_attention_agree():
    batch = padded_batch()
    eager = modulated()
    sdpa = modulated()
    sdpa.config._attn_implementation = "sdpa"
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(sdpa(**batch).logits[keep], eager(**batch).logits[keep], atol=1e-5, rtol=0)


def test_bf16_runs_and_stays_close_to_fp32():
    batch = padded_batch()
    reference = modulated()(**batch).logits
    model = modulated().to(torch.bfloat16)
    out = model(**batch, labels=batch["input_ids"], output_hycam_routing=True)
    assert model.model.layers[0].self_attn.hycam_modules["default"].W_in.dtype == torch.bfloat16
    assert out.hycam_router_probs.dtype == torch.float32 and torch.isfinite(out.loss)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep].float(), reference[keep], atol=0.05, rtol=0.05)


def test_padding_does_not_change_a_sequences_outputs():
    model = modulated()
    batch = padded_batch()
    row = 2
    alone = batch["input_ids"][row : row + 1, batch["attention_mask"][row].bool()]
    single = model(input_ids=alone, output_hycam_routing=True)
    together = model(**batch, output_hycam_routing=True)
    keep = batch["attention_mask"][row].bool()
    torch.testing.assert_close(together.logits[row, keep], single.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together.hycam_router_probs[:, row, keep], single.hycam_router_probs[:, 0], atol=1e-5, rtol=0)


def saved_for_backward(model, batch, grad: bool) -> list:
    """The tensors autograd saved for backward during one forward, with grad enabled or not."""
    saved = []
    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                                 lambda t: t):
        model(**batch, output_hycam_routing=True)
    return saved


def test_no_grad_evaluation_builds_no_graph():
    model, batch = modulated(), padded_batch()
    assert saved_for_backward(model, batch, grad=True)  # the probe sees a graph where one is built
    assert not saved_for_backward(model, batch, grad=False)  # nothing inside turns gradients back on
