"""main.py through the real DeepSpeed engine on CPU: HyCAM trains, resumes, runs on 2 ranks."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, standalone_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hycam.baselines import methods
from hycam.data import DataError
from hycam.train import loop

FAST = ["--max_records_per_task", "3", "--max_length", "512", "--micro_batch_size", "2", "--grad_accum", "1",
        "--rank", "8", "--num_specialized", "3", "--warmup_ratio", "0", "--max_eval_records_per_task", "1",
        "--patience", "0"]


def run(model_dir, data, out, *extra):
    return loop.main(["--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *FAST, *extra])


def strict_json(line: str) -> dict:
    """A metrics line parsed as JSON is: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def backbone_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrapper a method put around its module."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".base.", ".")


def test_hycam_lowers_the_loss_and_changes_only_its_parameters(tiny_model_dir, shared_data, tmp_path):
    """Through DeepSpeed end to end; every method's changed set under a plain optimizer: test_method_steps."""
    method = "hycam"
    _, model = run(tiny_model_dir, shared_data, tmp_path, "--method", method, "--max_steps", "12",
                   "--eval_interval", "12", "--lr", "2e-2", "--epochs", "100")
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["task_loss"] for row in rows if row["split"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    trained, owned = methods.trainable(model, method), methods.saved(model, method)
    for name, param in model.named_parameters():
        if name in trained:
            continue
        if backbone_name(name) in base:
            assert torch.equal(param.detach(), base[backbone_name(name)].detach()), name
        else:  # a frozen part of the method itself (the authors' untrained router)
            assert name in owned, name


def test_checkpoints_hold_the_trained_weights_only(tiny_model_dir, shared_data, tmp_path):
    _, model = run(tiny_model_dir, shared_data, tmp_path, "--max_steps", "2", "--eval_interval", "2")
    saved = load_file(tmp_path / "last" / "hycam_model.safetensors")
    assert set(saved) == set(methods.saved(model, "hycam"))
    reloaded = methods.load_into(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "last")
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    model.eval()
    assert torch.equal(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("stage", [0, 2, 3])  # the optimizer state sits in other places under each
def test_resume_after_an_interruption_reaches_the_same_weights(stage, tiny_model_dir, shared_data, tmp_path):
    schedule = ["--max_steps", "6", "--eval_interval", "2", "--lr", "1e-2", "--epochs", "100",
                "--zero_stage", str(stage), "--warmup_ratio", "0.3"]
    run(tiny_model_dir, shared_data, tmp_path / "straight", *schedule)
    run(tiny_model_dir, shared_data, tmp_path / "resumed", *schedule, "--halt_after_steps", "5")
    assert not (tmp_path / "resumed" / "last").exists()
    run(tiny_model_dir, shared_data, tmp_path / "resumed", *schedule, "--resume", "true")
    straight = load_file(tmp_path / "straight" / "last" / "hycam_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last" / "hycam_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_malformed_task_file_stops_before_training_with_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"task": "t", "instruction": "i", "input": "", "output": "o"})
    bad.write_text(good + "\n" + '{"task": "t", "instruction": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2|bad\.jsonl:2"):
        run(tiny_model_dir, bad, tmp_path / "out", "--max_steps", "1")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_an_existing_run_is_not_overwritten(tiny_model_dir, shared_data, tmp_path):
    run(tiny_model_dir, shared_data, tmp_path, "--max_steps", "1", "--eval_interval", "1")
    with pytest.raises(FileExistsError, match="holds a finished run .* evaluate it with hycam-eval"):
        run(tiny_model_dir, shared_data, tmp_path, "--max_steps", "1")


def test_two_cpu_processes_train_and_save_one_checkpoint(tiny_model_dir, shared_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "main.py"), "--model", str(tiny_model_dir), "--data", str(shared_data),
               "--output_dir", str(tmp_path), *FAST, "--max_steps", "3", "--eval_interval", "3",
               "--balance_scope", "global", "--lr", "1e-2"]
    done = subprocess.run(command, cwd=REPO, env=standalone_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["hycam_config.json", "hycam_model.safetensors",
                                                                      "method.json"]
    train_steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_steps if r["split"] == "train"] == [1, 2, 3]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, shared_data, tmp_path,
                                                                   monkeypatch):
    prepare, calls = methods.prepare, []

    def poisoned(model, method, options):  # training forwards after the 4th return NaN logits
        model = prepare(model, method, options)
        model.lm_head.register_forward_hook(
            lambda m, i, out: out * float("nan") if m.training and calls.append(1) is None and len(calls) > 4 else out)
        return model

    monkeypatch.setattr(methods, "prepare", poisoned)
    with pytest.raises(SystemExit, match="the loss is nan at step 5"):
        run(tiny_model_dir, shared_data, tmp_path, "--max_steps", "8", "--eval_interval", "2", "--epochs", "100")
    good = json.loads((tmp_path / "best" / "method.json").read_text())
    assert good["step"] in (2, 4) and (tmp_path / "resume").is_dir()
    assert not (tmp_path / "last").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_and_save_whole_tensors(stage, tiny_model_dir, shared_data, tmp_path):
    _, model = run(tiny_model_dir, shared_data, tmp_path, "--zero_stage", str(stage), "--max_steps", "2",
                   "--eval_interval", "2", "--lr", "1e-2")
    saved = load_file(tmp_path / "last" / "hycam_model.safetensors")
    expected = {name: p.ds_shape if hasattr(p, "ds_shape") else p.shape
                for name, p in methods.saved(model, "hycam").items()}
    assert {name: tuple(t.shape) for name, t in saved.items()} == {n: tuple(s) for n, s in expected.items()}
    assert all(t.abs().sum() > 0 for t in saved.values())  # trained, whole: the zero-initialised ones too


def test_the_run_ends_by_printing_the_evaluation_command_of_its_checkpoint(tiny_model_dir, shared_data, tmp_path,
                                                                           capsys):
    run(tiny_model_dir, shared_data, tmp_path, "--max_steps", "1", "--eval_interval", "1")
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"[hycam] evaluate it: hycam-eval --checkpoint {tmp_path / 'best'}"
    assert (tmp_path / "best" / methods.METHOD_FILE).is_file()


def test_bf16_training_follows_float32_within_half_a_percent(tiny_model_dir, shared_data, tmp_path):
    losses = {}
    for bf16 in ("false", "true"):
        run(tiny_model_dir, shared_data, tmp_path / bf16, "--max_steps", "4", "--eval_interval", "4", "--bf16", bf16)
        lines = [json.loads(line) for line in (tmp_path / bf16 / "metrics.jsonl").read_text().splitlines()]
        losses[bf16] = [line["loss"] for line in lines]  # 4 training steps, then the validation loss
    assert len(losses["true"]) == 5 and losses["true"] != losses["false"]
    assert losses["true"] == pytest.approx(losses["false"], rel=0.005)
