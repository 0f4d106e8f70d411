"""Multi-task supervised fine-tuning with DeepSpeed: HyCAM, its ablations and the paper's baselines.

    python main.py --config configs/cpu_smollm2.yaml            # one process (CPU or one GPU)
    deepspeed main.py --config configs/paper/qwen2.5-0.5b.yaml  # every GPU of this machine
    torchrun --nproc_per_node 2 main.py --config ...            # the same, started by torch
    bash run_model_base.sh --help                               # multi-GPU / multi-node launcher
    python main.py --help                                       # every option, with its default

The loop itself is `hycam.train.loop` (`main(argv)` runs it in-process).
"""

import logging
import sys

# bitsandbytes (imported by peft) warns on import on AVX512-BF16 CPUs that an optional kernel from the Hub did
# not load; it falls back to its own, and this command's errors stay one line on stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from hycam.train.loop import cli  # noqa: E402

if __name__ == "__main__":
    cli(sys.argv[1:])
