"""A HyCAM model is an ordinary module: it pickles, saves whole, deep-copies and compiles like the base model."""

import copy
import io
import pickle

import pytest
import torch
import transformers
from conftest import padded_batch, router_grad, tiny_model

import hycam


def modulated():
    return hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3)).train()


def labelled(batch):
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def run(model, batch):
    """Outputs and router gradients of one seeded training forward and backward."""
    model.zero_grad()
    torch.manual_seed(5)
    out = model(**batch, output_hycam_routing=True)
    out.loss.backward()
    grads = [router_grad(layer.self_attn.hycam_modules["default"]).clone() for layer in model.model.layers]
    return out.loss.detach(), out.balance_loss.detach(), out.hycam_router_probs.detach(), grads


def torch_save_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [lambda m: pickle.loads(pickle.dumps(m)), torch_save_round_trip, copy.deepcopy],
                         ids=["pickle", "torch.save", "deepcopy"])
def test_a_copied_model_routes_reports_and_trains_like_the_original(copier):
    model, batch = modulated(), labelled(padded_batch())
    expected = run(model, batch)
    copied = copier(model)
    torch.testing.assert_close(run(copied, batch), expected)
    hycam.remove(copied)  # the copy's hooks are its own
    torch.testing.assert_close(run(model, batch), expected)


def test_dynamo_sees_the_base_models_graph_breaks_in_training_and_generation():
    batch = labelled(padded_batch())
    base = torch._dynamo.explain(tiny_model().train())(**batch).graph_break_count
    model = modulated()
    assert torch._dynamo.explain(model)(**batch, output_hycam_routing=True).graph_break_count == base
    assert torch._dynamo.explain(model)(**batch, num_items_in_batch=torch.tensor(25)).graph_break_count == base
    with torch.no_grad():
        base = torch._dynamo.explain(tiny_model())(**padded_batch()).graph_break_count
        assert torch._dynamo.explain(model.eval())(**padded_batch()).graph_break_count == base


def test_fullgraph_compile_gives_the_eager_loss_and_router_gradients():
    batch = labelled(padded_batch())
    torch._dynamo.reset()
    model = modulated()
    expected = run(model, batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, batch), expected)


def test_training_under_compile_does_not_recompile_after_the_first_step():
    torch._dynamo.reset()
    model = modulated()
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(hycam.trainable_parameters(model).values(), lr=0.1)
    frames = []
    for step in range(3):
        batch = labelled(padded_batch(seed=step))
        compiled(**batch, num_items_in_batch=torch.tensor(20 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames[2] == frames[0]


def test_compiled_generation_gives_the_eager_tokens_and_compiles_once():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3)).eval()
    ids = padded_batch(batch=1)["input_ids"]
    settings = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                    do_sample=False, pad_token_id=0)
    config = transformers.CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # generate compiles on accelerators only, unless told
    compiled = dict(cache_implementation="static", compile_config=config)
    eager = model.generate(**settings)
    torch._dynamo.reset()
    assert torch.equal(model.generate(**settings, **compiled), eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert torch.equal(model.generate(**settings, **compiled), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
