"""The process group: every rank's start-up, and a plain `python main.py` made a group of one."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(timeout_seconds: float) -> tuple[int, int]:
    """(rank, world size); a plain `python main.py` becomes a one-process group. A collective that
    waits longer than `timeout_seconds` for another rank raises instead of hanging."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    timeout = timedelta(seconds=timeout_seconds)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    # DeepSpeed makes its data-parallel groups with new_group(), which takes torch's default timeout
    # (30 minutes), not the world group's: make the default this run's.
    c10d = dist.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
