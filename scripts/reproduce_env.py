"""What the units of scripts/reproduce.py run in: the base model's plain copy, a subprocess with this
checkout's hycam, and the one commit the study runs from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from reproduce_report import atomic_write  # noqa: E402


def save_dequantised(model: str, target: Path) -> None:
    """The model's fp32 weights and tokenizer as a plain checkpoint, checked to give the same prompt ids
    and logits as the original before it is moved into place."""
    import torch
    from transformers import AutoModelForCausalLM

    from hycam.data import Record, prompt_ids
    from hycam.data.models import load_model, load_tokenizer

    tokenizer, original = load_tokenizer(model), load_model(model).eval()
    config = original.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are fp32 now; transformers refuses to save "quantized" ones
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(original.state_dict())
    plain.generation_config = original.generation_config
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    probe = Record("probe", "Name three prime numbers.", "", "2, 3 and 5.")
    ids = prompt_ids(probe, tokenizer, "auto")
    with torch.no_grad():
        same = (prompt_ids(probe, load_tokenizer(str(tmp)), "auto") == ids and torch.equal(
            original(torch.tensor([ids])).logits, load_model(str(tmp)).eval()(torch.tensor([ids])).logits))
    if not same:
        raise SystemExit(f"reproduce: the de-quantised copy of {model} in {tmp} differs from the original")
    tmp.rename(target)


def subprocess_runner(argv: list[str], log: Path, threads: int = 2) -> int:
    # PYTHONPATH: every unit runs this checkout's hycam, whether or not (or wherever) it is installed.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    with log.open("w") as out:
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def git_state(repo: Path = REPO) -> tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it) of the checkout the study runs from."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                             capture_output=True, text=True).stdout.strip()
    return head or "unknown", bool(changes)


def check_commit(root: Path, allow_dirty: bool, quick: bool, repo: Path = REPO) -> None:
    """Records the commit in STUDY/provenance.json; a dirty tree, or another commit than the one the study
    started from, stops a study (a smoke run only warns), unless `allow_dirty`, which the record keeps."""
    head, dirty = git_state(repo)
    file = root / "provenance.json"
    record = json.loads(file.read_text()) if file.is_file() else {"commit": head, "dirty": False}
    problem = ("the checkout has uncommitted changes" if dirty else f"the study started at commit "
               f"{record['commit']}, the checkout is at {head}" if record["commit"] != head else None)
    if problem and not (allow_dirty or quick):
        raise SystemExit(f"reproduce: {problem}; run the study from a worktree of one commit "
                         "(git worktree add ../study HEAD), or pass --allow_dirty")
    if problem:
        print(f"[reproduce] warning: {problem}", file=sys.stderr)
    if not file.is_file() or (problem and not record["dirty"]):
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps({**record, "dirty": bool(problem)}, indent=2) + "\n")
