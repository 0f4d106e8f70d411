"""Tiny random Llama, Qwen2 and Mistral models, and the paths the tests read."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}
VOCAB = 128

# The tests and the subprocesses they start (DeepSpeed, torchrun) import this checkout's hycam, installed or
# not: plain `pytest` puts only tests/ on the path, and an installed hycam may be another checkout's.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    config_class, model_class = FAMILIES[family]
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                    attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(seed)
    return model_class(config_class(**{**settings, **overrides})).to(dtype).eval()


def padded_batch(seed: int = 1, batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Token ids with left padding of different lengths in each row: mixed lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def router_grad(cam) -> torch.Tensor:
    """The gradient of a HyCAM module's W_router: the last rows of W_in's, or a frozen router's own."""
    return cam.W_in.grad[-cam.num_specialized:] if cam.router_rows else cam.W_router.grad


def error_line(capsys) -> str:
    """The one line a command printed to stderr for bad input; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def standalone_env() -> dict:
    """This process's environment without the process group an in-process `main()` left in it (its port is
    taken while this process lives): for a subprocess that must start a group of its own."""
    group = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in group}, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: the method's tests, a few seconds each: `python -m pytest -m fast tests`")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning makes them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


def save_tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer of 300 tokens with a ChatML template: small enough for fast tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["Let's think step by step. The answer is"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer, saved like a pretrained model."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = save_tiny_tokenizer(directory)
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(directory)
    return directory
