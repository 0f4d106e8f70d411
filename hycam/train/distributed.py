"""The process group: every rank's start-up (a plain `python main.py` made a group of one), ZeRO-3's
sharded model construction, and what a lost rank looks like when a collective fails."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from hycam.train.optimization import zero_stage


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


def launcher_pid() -> int | None:
    """The launcher that started this worker (torchrun sets LOCAL_WORLD_SIZE, deepspeed's LOCAL_SIZE; neither
    is set by `init_distributed`'s group of one); None for a process started otherwise."""
    launched = "LOCAL_WORLD_SIZE" in os.environ or "LOCAL_SIZE" in os.environ
    return os.getppid() if launched else None


@contextlib.contextmanager
def sharded_construction(ds_config: dict):
    """Under ZeRO-3 (`ds_config`'s stage), transformers' from_pretrained in the block builds the model inside
    deepspeed.zero.Init: each rank allocates its partition only and rank 0 alone reads the weights. Without it
    every rank would hold the whole model and DeepSpeed would move it whole onto each device first."""
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # transformers keeps a weak reference only: the object must live while the model is built and prepared
    alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later from_pretrained calls in this process build whole models again
        del alive


def return_freed_host_memory() -> None:
    """Fixes glibc's mmap threshold (128 KiB) so that freed large blocks go back to the system. Otherwise glibc
    raises the threshold after the first large frees, and the whole parameters ZeRO-3 gathers and frees at every
    layer stay in the heap: on a CPU run, the whole model again in each rank's memory. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


_LOST = ("connection reset", "connection closed", "connection refused", "broken pipe", "remote process exited",
         "communicator was aborted", "network error")
"""How gloo, NCCL and the store say that the other end of a connection is gone."""


def lost_rank(err: RuntimeError) -> str | None:
    """Why `err` means another rank (or node) is gone, as the run's message says it; None when it does not."""
    text = str(err).lower()
    if "timed out" in text or "timeout" in text:
        return "another rank did not answer within --dist_timeout (it stopped or died)"
    if any(words in text for words in _LOST):
        return "lost the connection to another rank (its process or node stopped)"
    return None
