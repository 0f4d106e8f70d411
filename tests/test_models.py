"""Which models HyCAM serves: causal LMs, bare backbones and other heads of Llama, Qwen2 and Mistral, MoE
models beside their own router outputs; and the layouts it refuses before changing anything."""

import pytest
import torch
from conftest import FAMILIES, padded_batch, router_grad
from transformers.modeling_outputs import BaseModelOutputWithPast

import hycam
from hycam.cam import HyCAM

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, attn_implementation="eager", pad_token_id=0)


def build(model_class, config_class, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY, **overrides})).train()


def with_hycam(model_class, config_class, coef, **overrides):
    model = build(model_class, config_class, **overrides)
    return hycam.apply(model, hycam.HyCAMConfig(rank=8, init_std=0.3, balance_coef=coef))


def router_grads(model) -> torch.Tensor:
    return torch.cat([router_grad(cam).flatten() for cam in model.modules() if isinstance(cam, HyCAM)])


def assert_balance_reaches_the_router(model_class, config_class, loss_of, **overrides):
    """loss_of(output).backward() trains the routers with 0.2 * balance_loss as if it had been added by hand."""
    attached = with_hycam(model_class, config_class, 0.2, **overrides)
    torch.manual_seed(4)
    loss_of(attached(**padded_batch())).backward()
    by_hand = with_hycam(model_class, config_class, 0.0, **overrides)
    torch.manual_seed(4)
    out = by_hand(**padded_batch(), output_hycam_routing=True)  # a bare backbone's balance loss is there when asked
    (loss_of(out) + 0.2 * out.balance_loss).backward()
    torch.testing.assert_close(router_grads(attached), router_grads(by_hand))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_bare_backbone_returns_its_output_with_hycams_fields_and_trains_the_router(family):
    from transformers import AutoModel

    config_class = FAMILIES[family][0]
    backbone_class = type(AutoModel.from_config(config_class(**TINY)))
    model = with_hycam(backbone_class, config_class, 0.1)
    out = model(**padded_batch(batch=3, length=12), output_hycam_routing=True)
    assert isinstance(out, BaseModelOutputWithPast) and type(out) is hycam.HyCAMModelOutput
    assert out.last_hidden_state.shape == (3, 12, 64) and out.balance_loss.shape == ()
    assert out.hycam_router_logits.shape == out.hycam_router_probs.shape == (2, 3, 12, 5)
    assert_balance_reaches_the_router(backbone_class, config_class, lambda o: o.last_hidden_state.pow(2).mean())


def test_question_answering_and_classification_heads_train_the_router_with_the_balance_loss():
    from transformers import LlamaConfig, LlamaForQuestionAnswering, LlamaForSequenceClassification

    assert_balance_reaches_the_router(LlamaForQuestionAnswering, LlamaConfig,
                                      lambda o: o.start_logits.logsumexp(-1).mean() - o.end_logits[:, 3].mean())
    assert_balance_reaches_the_router(LlamaForSequenceClassification, LlamaConfig, lambda o: o.logits[:, 1].mean(),
                                      num_labels=3)


def test_outputs_of_any_head_pickle_as_their_hycam_class():
    import pickle

    from transformers import LlamaConfig, LlamaForQuestionAnswering

    model = with_hycam(LlamaForQuestionAnswering, LlamaConfig, 0.1)
    out = model(**padded_batch(), output_hycam_routing=True)
    assert type(out).__name__ == "HyCAMQuestionAnsweringModelOutput"  # made on first use, named nowhere
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is type(out) and again.keys() == out.keys()
    torch.testing.assert_close(again.hycam_router_probs, out.hycam_router_probs)


def test_mixtral_keeps_its_router_logits_and_aux_loss_beside_hycams():
    from transformers import MixtralConfig, MixtralForCausalLM

    model = with_hycam(MixtralForCausalLM, MixtralConfig, 0.1, num_local_experts=4, num_experts_per_tok=2,
                       output_router_logits=True, router_aux_loss_coef=0.02)
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, output_hycam_routing=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (3 * 12, 4)  # Mixtral's, per layer
    assert out.hycam_router_logits.shape == (2, 3, 12, 5) and out.balance_loss.shape == ()
    task = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, task + 0.02 * out.aux_loss)  # Mixtral's own loss, HyCAM's not added


def refused(model, match):
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        hycam.apply(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == names  # nothing changed
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_a_multimodal_wrapper_is_refused_by_name():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TINY)))
    refused(model, "LlavaForConditionalGeneration is a multimodal model")


def test_gemma2_whose_attention_output_is_normalised_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=16))
    refused(model, "Gemma2ForCausalLM: Gemma2DecoderLayer normalises the attention output before the residual add")


def test_stablelm_with_parallel_residual_is_refused():
    from transformers import StableLmConfig, StableLmForCausalLM

    model = StableLmForCausalLM(StableLmConfig(**TINY, use_parallel_residual=True))
    refused(model, "StableLmForCausalLM runs attention and MLP in parallel")
