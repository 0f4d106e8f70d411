"""A hub id as --model: loaded through transformers from a Hugging Face cache with HF_HUB_OFFLINE=1 (no
network), at the revision asked; a hub id that is not cached is one line naming it and how to get it."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, save_tiny_tokenizer, standalone_env, tiny_model

HUB_ID = "tiny-org/tiny-llama"
MAIN_COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40


def cache_snapshot(cache, commit: str, ref: str, seed: int) -> None:
    """The hub cache's layout: models--ORG--NAME/snapshots/COMMIT/<files> and refs/REF holding COMMIT."""
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tokenizer = save_tiny_tokenizer(snapshot)
    tiny_model("llama", seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    cache_snapshot(cache, MAIN_COMMIT, "main", seed=0)
    cache_snapshot(cache, OTHER_COMMIT, "v1", seed=1)
    return cache


def offline(cache) -> dict:
    return {**standalone_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
            "OMP_NUM_THREADS": "1"}


def command(cache, *argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=offline(cache), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained_from_the_hub(hub_cache, tmp_path_factory):
    """main.py on a hub id at tag v1, offline: the run and where it went."""
    out = tmp_path_factory.mktemp("run") / "run"
    done = command(hub_cache, "main.py", "--model", HUB_ID, "--revision", "v1", "--data", "synthetic",
                   "--output_dir", str(out), "--max_records_per_task", "3", "--max_length", "256", "--rank", "8",
                   "--num_specialized", "2", "--max_steps", "1", "--eval_interval", "1", "--grad_accum", "1",
                   "--max_eval_records_per_task", "1")
    return done, out


def test_main_py_trains_a_cached_hub_id_offline_and_records_it(trained_from_the_hub):
    done, out = trained_from_the_hub
    assert done.returncode == 0, done.stderr[-3000:]
    method = json.loads((out / "last" / "method.json").read_text())
    assert (method["model"], method["revision"]) == (HUB_ID, "v1")


def test_each_revision_loads_its_snapshot_and_hycam_eval_rebuilds_the_runs(trained_from_the_hub, hub_cache):
    """refs/main and refs/v1 name snapshots of different weights; the run trained on v1, and hycam-eval's
    loader rebuilds its checkpoint on v1 (the recorded revision), not on main."""
    _, out = trained_from_the_hub
    script = ("from hycam.data.models import load_model\n"
              "from hycam.evaluation.loading import load_model_for, read_checkpoint\n"
              f"for rev in (None, 'main', 'v1', '{OTHER_COMMIT}'):\n"
              f"    print(float(load_model('{HUB_ID}', revision=rev).lm_head.weight.sum()))\n"
              f"print(float(load_model_for(read_checkpoint('{out / 'last'}'))[0].lm_head.weight.sum()))")
    done = command(hub_cache, "-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    default, main, v1, commit, rebuilt = map(float, done.stdout.split())
    assert default == main != v1 == commit == rebuilt
    config = json.loads((hub_cache / f"models--tiny-org--tiny-llama/snapshots/{OTHER_COMMIT}/config.json").read_text())
    assert v1 == float(tiny_model("llama", seed=1, vocab_size=config["vocab_size"]).lm_head.weight.detach().sum())


@pytest.mark.parametrize("argv", [
    ["main.py", "--model", "tiny-org/not-cached", "--data", "synthetic"],
    ["-m", "hycam.evaluation.evaluate", "--base-model", "tiny-org/not-cached", "--tasks", "synthetic"],
])
def test_an_uncached_hub_id_offline_is_one_line_naming_it_and_how_to_get_it(hub_cache, tmp_path, argv):
    done = command(hub_cache, *argv, "--output_dir" if argv[0] == "main.py" else "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert "tiny-org/not-cached" in line and "HF_HUB_OFFLINE" in line
    assert "hf download tiny-org/not-cached" in line and "local folder" in line
