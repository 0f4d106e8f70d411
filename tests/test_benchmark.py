"""scripts/benchmark.py's decoding measurement: every model decodes the same tokens, compiled or not."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_model

import hycam
from hycam.evaluation import speed

ROOT = Path(__file__).resolve().parents[1]


def test_stepwise_decoding_gives_every_model_its_own_greedy_tokens_compiled_or_not():
    base = tiny_model()
    modulated = hycam.apply(copy.deepcopy(base), hycam.HyCAMConfig(rank=8, init_std=0.3))
    models = {"base": base, "hycam": modulated, "hycam, torch.compile": modulated}
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    got = speed.stepwise_decode_rates(models, ids, new_tokens=5, rounds=2, compiled={"hycam, torch.compile"})
    for name, model in (("base", base), ("hycam", modulated)):
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)[:, ids.size(1):]
        assert got[name]["tokens"] == expected.tolist()
        assert len(got[name]["all"]) == 2 and min(got[name]["all"]) > 0
    assert got["hycam, torch.compile"]["tokens"] == got["hycam"]["tokens"] != got["base"]["tokens"]


def test_generation_only_run_writes_the_paired_ratio(tmp_path):
    command = [sys.executable, "scripts/benchmark.py", "--model", "tiny", "--generation-only", "--threads", "1",
               "--gen-repeats", "3", "--new-tokens", "4", "--prompt-len", "8", "--out", str(tmp_path)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    result = json.loads((tmp_path / "benchmark.json").read_text())
    rates = {name: result["generation"][name]["all"] for name in ("base", "hycam")}
    ratio = speed.paired_ratio(rates["hycam"], rates["base"])
    assert ratio["rounds"] == 3 and result["ratios"] == {"generation hycam/base": ratio["median"]}
    assert f"| hycam | {result['generation']['hycam']['tokens_per_s']:.2f} | {ratio['median']:.3f} |" in \
        (tmp_path / "benchmark.md").read_text()
