"""HyCAM on the text model inside a multimodal model, as the refusal of the multimodal model advises."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import hycam
from hycam.cam import HyCAM


def tiny_llava() -> LlavaForConditionalGeneration:
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=127))


def test_hycam_on_llavas_language_model_trains_with_an_image_and_the_balance_loss_reaches_the_router():
    llava = tiny_llava()
    hycam.apply(llava.model.language_model, hycam.HyCAMConfig(num_specialized=3, rank=8))
    llava.train()
    ids = torch.cat([torch.full((2, 4), 127), torch.randint(1, 120, (2, 6))], dim=1)  # 4 image tokens: 2 x 2 patches
    out = llava(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), labels=ids)
    out.loss.backward()
    routers = [cam.W_in.grad[-3:] for cam in llava.modules() if isinstance(cam, HyCAM)]
    # zero init: the task loss gives the router nothing, so this is the balance term's gradient
    assert len(routers) == 2 and all(grad.abs().sum() > 0 for grad in routers)
