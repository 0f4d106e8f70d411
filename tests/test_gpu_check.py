"""scripts/gpu_check.sh on CPU: the same code as on a GPU, on the tiny config, really computed."""

import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch

from conftest import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

METHODS = {"floor", "hycam", "lora"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True, env=env, cwd=out)
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_the_fused_path_is_checked_in_both_dtypes_with_computed_errors(report):
    result, _ = report
    assert [(c["shape"], c["dtype"]) for c in result["checks"]] == [("tiny", "float32"), ("tiny", "bfloat16")]
    names = {"W_in", "N", "B"}
    for check in result["checks"]:
        errors = check["relative_errors"]
        assert {f"gradient of {n}" for n in names} | {"gradient of h_norm"} <= set(errors)
        assert all(math.isfinite(e) and e > 0 for e in errors.values())  # rounding error, not a copy
        assert check["max_relative_error"] == max(errors.values()) <= check["tolerance"] and check["ok"]
    fp32, bf16 = (c["max_relative_error"] for c in result["checks"])
    assert fp32 < 1e-5 < 1e-3 < bf16  # bfloat16 rounds at 2^-8, float32 at 2^-23


def test_floor_hycam_and_lora_are_timed_and_counted(report):
    result, _ = report
    rows = result["speed"]["tiny"]
    assert set(rows) == METHODS
    d, layers, n, r = 64, 2, 5, 64  # the tiny shape, HyCAM's defaults
    assert rows["hycam"]["params"]["trainable"] == layers * (d * d + n * r * d + n * r * r + n * d * r + n * d)
    assert rows["floor"]["params"]["trainable"] == 0 < rows["lora"]["params"]["trainable"]
    for row in rows.values():
        assert len(row["step_s_all"]) == 2 and len(row["decode_all"]) == 2
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("step_s", "decode_tokens_per_s", "peak_mb"))


def test_the_markdown_table_holds_the_json_figures(report):
    result, md = report
    for check in result["checks"]:
        assert f"| tiny | {check['dtype']} | {check['max_relative_error']:.2e} |" in md
    for method, row in result["speed"]["tiny"].items():
        assert f"| tiny | {method} | {row['params']['trainable']:,} | {row['step_s']:.4f} |" in md


def test_a_wrong_fused_path_fails_the_check(monkeypatch):
    def without_probabilities(x, up, bias, probs):  # a plausible bug: the experts' weights dropped
        return torch.nn.functional.silu(torch.einsum("...nr,ndr->...nd", x, up)).sum(-2)

    monkeypatch.setattr("hycam.fast.weighted_silu_sum", without_probabilities)
    errors = gpu_check.check_fused(16, "cpu", torch.float32, tokens=4)
    assert errors["output (training path)"] > gpu_check.TOLERANCE["float32"] * 1000
