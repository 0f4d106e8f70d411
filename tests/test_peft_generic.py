"""peft's own generic tester, `PeftCommonTester`, run against HyCAM on tiny Llama, Qwen2 and Mistral models.

`PeftCommonTester` (tests/testing_common.py) is how peft checks that a method keeps peft's promises: naming,
saving and loading, several adapters, deleting, unloading, disabling, training, generation, state dicts.
It ships in peft's source distribution only, so it is downloaded at test time for the installed peft
(`pip download --no-binary :all:`), kept in pytest's cache, and the checks are skipped, with the reason, where
it cannot be had. Nothing of it is copied into this project.

Every check runs on each of the three models (about 20 s in all once the sdist is cached). The checks that do not
apply to HyCAM are listed in NOT_APPLICABLE and skipped with the reason; peft's own rules skip one more
(`bias="all"`, a LoRA option HyCAM's typed config refuses).
"""

import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest
import torch
from conftest import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

import hycam

CONFIG = {"num_specialized": 2, "rank": 4}
NON_IDENTITY = {**CONFIG, "init_weights": False}
"""peft's tests switch every method's identity init off where a check must see the adapter change the outputs."""

CHECKS = {
    "_test_model_attr": CONFIG, "_test_adapter_name": CONFIG, "_test_prepare_for_training": CONFIG,
    "_test_save_pretrained": NON_IDENTITY, "_test_save_pretrained_selected_adapters": NON_IDENTITY,
    "_test_save_pretrained_adapter_name_substring": CONFIG, "_test_from_pretrained_config_construction": CONFIG,
    "_test_load_multiple_adapters": CONFIG, "_test_generate": CONFIG, "_test_generate_pos_args": CONFIG,
    "_test_generate_half_prec": CONFIG, "_test_add_adapter_no_autocast_adapter_dtype": CONFIG,
    "_test_training": CONFIG, "_test_training_layer_indexing": CONFIG,
    "_test_training_gradient_checkpointing": CONFIG, "_test_inference_safetensors": CONFIG,
    "_test_peft_model_device_map": CONFIG, "_test_delete_adapter": CONFIG, "_test_delete_inactive_adapter": CONFIG,
    "_test_delete_unknown_adapter_raises": CONFIG, "_test_unload_adapter": NON_IDENTITY,
    "_test_disable_adapter": NON_IDENTITY, "_test_adding_multiple_adapters_with_bias_raises": CONFIG,
    "_test_lora_conversion": NON_IDENTITY, "_test_get_base_model_state_dict": CONFIG,
}
EXTRA_ARGS = {"_test_training_gradient_checkpointing": {"use_reentrant": False},
              "_test_generate_pos_args": {"raises_err": False},
              "_test_add_adapter_no_autocast_adapter_dtype": {"dtype": torch.bfloat16}}
NOT_APPLICABLE = {
    "_test_merge_layers": "merging: HyCAM is not linear in h_norm (h_att * SiLU(h_norm W)), so it has no weight "
                          "delta to merge; merge_adapter and merge_and_unload refuse it",
    "_test_merge_layers_multi": "merging: HyCAM is not linear in h_norm",
    "_test_merge_layers_nan": "merging: HyCAM is not linear in h_norm",
    "_test_merge_layers_fp16": "merging: HyCAM is not linear in h_norm",
    "_test_merge_layers_is_idempotent": "merging: HyCAM is not linear in h_norm",
    "_test_safe_merge": "merging: HyCAM is not linear in h_norm",
    "_test_mixed_adapter_batches": "a different adapter per row (`adapter_names=`): HyCAM applies one adapter at "
                                   "a time, its routers and balance loss are per adapter",
    "_test_generate_with_mixed_adapter_batches_and_beam_search": "a different adapter per row: one adapter at a time",
    "_test_weighted_combination_of_adapters": "add_weighted_adapter combines LoRA/IA3 weight deltas; HyCAM has none",
    "_test_training_gradient_checkpointing[use_reentrant=True]":
        "reentrant checkpointing runs the forward under no_grad, so the balance loss could not train the router: "
        "HyCAM refuses it with a RuntimeError naming use_reentrant=False",
    "_test_load_model_low_cpu_mem_usage": "low_cpu_mem_usage: HyCAM's modules are made whole on the layer's device "
                                          "(they are small), not left on the meta device for a file to fill",
}
CASES = [(check, family) for check in CHECKS for family in sorted(FAMILIES)]


def _download(version: str, folder: Path) -> None:
    """tests/testing_common.py and testing_utils.py of the peft `version` sdist, as a package in `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"peft=={version}", "-d", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise OSError(f"pip download failed: {done.stderr.strip()[-300:]}")
        (sdist,) = Path(tmp).glob("peft-*.tar.gz")
        staged = Path(tmp) / folder.name
        staged.mkdir()
        with tarfile.open(sdist) as archive:
            for name in ("testing_common.py", "testing_utils.py"):
                source = archive.extractfile(f"peft-{version}/tests/{name}")
                (staged / name).write_bytes(source.read())
        (staged / "__init__.py").write_text("")  # their relative import needs a package
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(folder)


def _import_tester(cache: Path):
    package = f"peft_{peft.__version__.replace('.', '_')}_tests"
    if not (cache / package / "testing_common.py").is_file():
        _download(peft.__version__, cache / package)
    sys.path.insert(0, str(cache))
    stub = None
    if importlib.util.find_spec("diffusers") is None:  # imported at its top for the Stable Diffusion cases only
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub
    try:
        return importlib.import_module(f"{package}.testing_common").PeftCommonTester
    finally:
        sys.path.remove(str(cache))
        if stub is not None:
            del sys.modules["diffusers"]


@pytest.fixture(scope="session")
def tester(request):
    cache_provider = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    cache = Path(cache_provider.mkdir("peft-sdist") if cache_provider else Path(tempfile.gettempdir()) / "peft-sdist")
    try:
        common = _import_tester(cache)
    except (subprocess.SubprocessError, OSError, KeyError, ValueError, ImportError) as err:
        pytest.skip(f"peft's generic tester (tests/testing_common.py of the peft {peft.__version__} sdist) could "
                    f"not be had: {type(err).__name__}: {err}")

    class HyCAMTester(common):
        transformers_class = AutoModelForCausalLM

        def prepare_inputs_for_testing(self):
            return {"input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]),
                    "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}

    return HyCAMTester()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("peft-generic")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
    return {family: str(root / family) for family in FAMILIES}


@pytest.mark.parametrize("check,family", CASES)
def test_peft_generic_check(tester, model_dirs, check, family):
    getattr(tester, check)(model_dirs[family], hycam.HyCAMConfig, dict(CHECKS[check]), **EXTRA_ARGS.get(check, {}))


@pytest.mark.parametrize("check", sorted(NOT_APPLICABLE))
def test_peft_generic_check_that_does_not_apply(check):
    pytest.skip(f"{check}: {NOT_APPLICABLE[check]}")


def test_reentrant_checkpointing_is_refused_with_its_reason(model_dirs):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), hycam.HyCAMConfig(**CONFIG))
    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        model.train()(input_ids=torch.tensor([[1, 2, 3]]))
