"""The name of every file and folder hycam writes or reads, in one place.

Imports nothing: the method, the baselines, both harnesses and the study all read their names here.
"""

# A HyCAM checkpoint (`hycam.save` / `hycam.load`).
HYCAM_CONFIG = "hycam_config.json"
HYCAM_WEIGHTS = "hycam_model.safetensors"

# A peft adapter, and a full state dict (`Trainer.save_model`, the `full` and LoRA-family baselines).
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""What peft puts before the base model's own parameter names in its files and its wrapped model."""

# A checkpoint of main.py: the method's weights and how to rebuild it.
METHOD = "method.json"

# A run directory of main.py.
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST, LAST, RESUME = "best", "last", "resume"
"""Checkpoint folders: the best validation loss, the last step, the state to resume from."""
LOCK = ".lock"

# What hycam-eval writes.
RESULTS = "results.json"
RESULTS_MD = "results.md"
GENERATIONS = "generations.jsonl"
