"""What trains is what the config says, through `requires_grad` itself: `hycam.apply`, `peft.get_peft_model`,
and the optimiser a Trainer or TRL builds all see the same exact set, for every named variant, with the
router trained or frozen (`train_router`)."""

import pytest
from conftest import tiny_model
from peft import get_peft_model

import hycam
from hycam.cam import HyCAM
from hycam.config import VARIANTS

# The HyCAM parameters of one layer that train, per variant (N_s = 3, r = r_s = 8). A trained router is rows of
# W_in and, with `bias` (authors), b_router; a frozen one is W_router and b_router, which never train.
TRAINABLE = {"hycam": {"W_in", "N", "B"}, "shared_only": {"W_in"}, "full_spec": {"W_in", "B"},
             "spec_only": {"W_in", "N", "B"}, "inverse_peft": {"W_in", "N_shared", "B_shared", "B"},
             "authors": {"W_in", "b_shared", "N", "B", "b_spec"}}
NORMS = ("input_layernorm", "post_attention_layernorm")
CASES = [(variant, router) for variant in VARIANTS for router in (True, False)]


def config(variant: str, train_router: bool, **extra) -> hycam.HyCAMConfig:
    sizes = {"full_spec": {}, "inverse_peft": {"shared_rank": 8}}.get(variant, {"rank": 8})
    count = {} if variant == "shared_only" else {"num_specialized": 3}
    return hycam.HyCAMConfig.variant(variant, train_router=train_router, **sizes, **count, **extra)


def expected(variant: str, train_router: bool, prefix: str = "", norms: bool = False) -> set[str]:
    params = TRAINABLE[variant] | ({"b_router"} if variant == "authors" and train_router else set())
    names = {f"{prefix}model.layers.{i}.self_attn.hycam_modules.default.{p}" for i in range(2) for p in params}
    return names | ({f"{prefix}model.layers.{i}.{norm}.weight" for i in range(2) for norm in NORMS} if norms else set())


def requiring_grad(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def assert_router_follows(model, train_router: bool) -> None:
    for cam in (m for m in model.modules() if isinstance(m, HyCAM)):
        if cam.num_specialized:
            assert cam.router_rows == (3 if train_router else 0)  # a trained router is W_in's last rows
            assert all(p.requires_grad == train_router for p in cam.router_parameters())  # W_router, b_router


@pytest.mark.fast
@pytest.mark.parametrize("variant, train_router", CASES)
def test_apply_trains_exactly_the_configs_parameters(variant, train_router):
    model = hycam.apply(tiny_model(), config(variant, train_router))
    norms = variant == "authors"  # train_layernorms
    trainable = expected(variant, train_router, norms=norms)
    assert requiring_grad(model) == set(hycam.trainable_parameters(model)) == trainable
    assert_router_follows(model, train_router)


@pytest.mark.fast
@pytest.mark.parametrize("variant, train_router", CASES)
def test_get_peft_model_trains_what_apply_does_and_counts_it_alike(variant, train_router):
    # peft's adapter file holds no backbone norm: the authors' norms train through hycam.apply only
    model = get_peft_model(tiny_model(), config(variant, train_router, train_layernorms=False))
    assert requiring_grad(model) == expected(variant, train_router, prefix="base_model.model.")
    trainable = hycam.trainable_parameters(model.get_base_model())
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())
    assert_router_follows(model, train_router)


def optimised(trainer) -> set[str]:
    trainer.create_optimizer()
    ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    return {name for name, p in trainer.model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("variant, train_router", CASES)
def test_a_trainers_optimiser_holds_exactly_the_configs_parameters(tmp_path, variant, train_router):
    from transformers import Trainer, TrainingArguments

    model = hycam.apply(tiny_model(), config(variant, train_router))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=True)
    assert optimised(Trainer(model=model, args=args)) == expected(variant, train_router, norms=variant == "authors")


@pytest.mark.parametrize("variant", ["hycam", "authors"])
def test_trl_with_a_frozen_router_peft_config_optimises_exactly_the_configs_parameters(tiny_model_dir, tmp_path,
                                                                                      variant):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=16, bf16=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_dict({"text": ["step by step"]}),
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         peft_config=config(variant, train_router=False, train_layernorms=False))
    assert optimised(trainer) == requiring_grad(trainer.model) == expected(variant, False, prefix="base_model.model.")
    assert_router_follows(trainer.model, train_router=False)
