"""HyCAM under FSDP2 (`torch.distributed.fsdp.fully_shard`) on two gloo ranks: hycam.save / hycam.load, peft's
save_pretrained, and resuming from a torch.distributed.checkpoint of the model and the optimizer, all on a
sharded model. One run of both ranks is shared by the tests; each rank reports what it saw."""

import socket

import numpy as np
import pytest
import torch
from conftest import padded_batch, tiny_model
from safetensors.torch import load_file

import hycam

fsdp = pytest.importorskip("torch.distributed.fsdp")
CONFIG = hycam.HyCAMConfig(rank=8, num_specialized=3, init_std=0.3)
STEPS = 2


def sharded_hycam(peft_model: bool = False) -> torch.nn.Module:
    """The README's recipe: HyCAM added first, then each decoder layer and the whole model sharded; fp32
    parameters (HyCAM's and the backbone's: one dtype a group) computing in bf16."""
    import peft

    base = tiny_model(seed=0).train()
    torch.manual_seed(1)  # the same HyCAM initialisation on both ranks
    model = peft.get_peft_model(base, CONFIG) if peft_model else hycam.apply(base, CONFIG)
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in hycam.decoder_layers(model):
        fsdp.fully_shard(layer, mp_policy=policy)
    return fsdp.fully_shard(model, mp_policy=policy)


def train(model, optimizer, rank: int, steps: int = STEPS) -> list[float]:
    """`steps` AdamW steps, each rank on its own rows of the batch; returns the losses of rank `rank`."""
    batch = {k: v[rank::2] for k, v in padded_batch(batch=4).items()}
    losses = []
    for _ in range(steps):
        torch.manual_seed(100 + len(losses))  # the same routing noise in a resumed run as in the first
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def whole(params: dict) -> dict:
    """Each sharded parameter gathered, as numpy: sent back to the test by value, not as shared memory."""
    return {name: p.full_tensor().detach().numpy() for name, p in params.items()}


def _worker(rank: int, port: int, tmp, results) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    report = {}
    model = sharded_hycam()
    optimizer = adamw(model)
    train(model, optimizer, rank)
    hycam.save(model, tmp / "hycam")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / "resume")
    report["saved"] = whole(hycam.hycam_parameters(model))
    report["continued"] = train(model, optimizer, rank)

    resumed = sharded_hycam()
    resumed_optimizer = adamw(resumed)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=tmp / "resume")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    report["resumed"] = train(resumed, resumed_optimizer, rank)

    dist.barrier()  # rank 0 wrote hycam.save's files
    loaded = sharded_hycam()
    hycam.load(loaded, tmp / "hycam")
    report["loaded"] = whole(hycam.hycam_parameters(loaded))
    results.put((rank, report | _peft_round(rank, tmp)))
    dist.destroy_process_group()


def _peft_round(rank: int, tmp) -> dict:
    """peft's save_pretrained of a sharded HyCAM adapter, called on every rank as Trainer and accelerate do: the
    shards are gathered, rank 0 writes."""
    model = sharded_hycam(peft_model=True)
    train(model, adamw(model), rank, steps=1)
    model.save_pretrained(tmp / "peft", is_main_process=rank == 0)
    trained = whole({n: p for n, p in model.named_parameters() if p.requires_grad})
    return {"peft_trained": {name.removeprefix("base_model.model."): t for name, t in trained.items()}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("fsdp2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork would inherit any process group an earlier test left in this process.
    results = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(_worker, args=(port, tmp, results), nprocs=2, start_method="spawn", join=False)
    reports = {}
    while not workers.join(timeout=1):  # raises, ending the other rank, as soon as one rank fails
        while not results.empty():  # read while they run: a report is larger than a pipe holds
            rank, report = results.get()
            reports[rank] = report
    while not results.empty():
        rank, report = results.get()
        reports[rank] = report
    return tmp, as_torch(reports[0]), as_torch(reports[1])


def as_torch(value):
    if isinstance(value, dict):
        return {key: as_torch(item) for key, item in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def test_hycam_save_of_a_sharded_model_writes_the_whole_trained_weights(ranks):
    tmp, rank0, rank1 = ranks
    written = load_file(tmp / "hycam" / "hycam_model.safetensors")
    assert written.keys() == rank0["saved"].keys()
    assert all(torch.equal(written[name], t) and torch.equal(rank1["saved"][name], t)
               for name, t in rank0["saved"].items())
    assert not all(torch.equal(t, torch.zeros_like(t)) for t in written.values())


def test_hycam_load_onto_a_sharded_model_gives_every_rank_the_saved_weights(ranks):
    _, rank0, rank1 = ranks
    for report in (rank0, rank1):
        assert all(torch.equal(report["loaded"][name], t) for name, t in rank0["saved"].items())


def test_resuming_from_a_distributed_checkpoint_continues_as_the_run_did(ranks):
    """Model and AdamW state through torch.distributed.checkpoint: the resumed steps' losses are the
    uninterrupted run's."""
    _, rank0, rank1 = ranks
    assert rank0["resumed"] == rank0["continued"] and rank1["resumed"] == rank1["continued"]


def test_peft_save_pretrained_of_a_sharded_model_reloads_on_a_plain_base(ranks):
    import peft

    tmp, rank0, _ = ranks
    restored = peft.PeftModel.from_pretrained(tiny_model(seed=0), tmp / "peft")
    params = {n.removeprefix("base_model.model."): p for n, p in restored.named_parameters() if "hycam_" in n}
    assert params.keys() == rank0["peft_trained"].keys()
    assert all(torch.equal(p.detach(), rank0["peft_trained"][name]) for name, p in params.items())
