"""hycam-eval on a user's own test files and on the untrained base model (issue 15), on a tiny Llama
with a tiny tokenizer: what is scored, what is printed and recorded, and the base model's numbers."""

import contextlib
import hashlib
import io
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import error_line
from transformers import AutoModelForCausalLM, AutoTokenizer

import hycam
from hycam.baselines.methods import MethodOptions, save_trained
from hycam.data import Record, first_per_task, load_records, prompt_ids, split_records, synthetic_tasks, tokenize_record
from hycam.evaluation import compare, evaluate
from hycam.evaluation.metrics import bleu4, rouge_l
from hycam.train.config import TrainConfig

SEED = 7
CAP = 40
FAST = ["--max-new-tokens", "3", "--batch-size", "25", "--max-length", "200", "--no-progress"]


def write_tasks(path, counts):
    """A task file of the generated tasks' first records: {task: how many}."""
    records = [r for task, n in counts.items() for r in synthetic_tasks(n, seed=0) if r.task == task]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    return path


def run_main(argv):
    """evaluate.main's exit code and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = evaluate.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def own(tiny_model_dir, tmp_path_factory):
    """A HyCAM run capped at 40 records per task, two user files, and hycam-eval run on them."""
    root = tmp_path_factory.mktemp("own")
    (root / "trainset").mkdir()
    hundred = write_tasks(root / "trainset" / "hundred.jsonl", {"sort": 100})  # the run's data, as a user may pass it
    mixed = write_tasks(root / "mixed.jsonl", {"reverse": 3, "capitalize": 4})
    cfg = TrainConfig(model=str(tiny_model_dir), data=[str(root / "trainset")], max_records_per_task=CAP, seed=SEED)
    (root / "run").mkdir()
    (root / "run" / "run_config.json").write_text(json.dumps(asdict(cfg)))
    model = hycam.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        hycam.HyCAMConfig(num_specialized=3, rank=8, init_std=0.3))
    checkpoint = root / "run" / "best"
    save_trained(model, "hycam", MethodOptions(rank=8, num_specialized=3), checkpoint,
                 {"model": cfg.model, "gguf_file": None, "seed": SEED, "template": cfg.template})
    runs = {"whole": ["--checkpoint", str(checkpoint), "--tasks", str(hundred)],
            "split": ["--checkpoint", str(checkpoint), "--tasks", str(hundred), "--split", "test"],
            "mixed_run": ["--checkpoint", str(checkpoint), "--tasks", str(mixed)],
            "base": ["--base-model", str(tiny_model_dir), "--tasks", str(mixed)]}
    done = {}
    for name, argv in runs.items():
        code, printed = run_main([*argv, *FAST, "--output-dir", str(root / name)])
        assert code == 0, name
        done[name] = SimpleNamespace(printed=printed, out=root / name,
                                     result=json.loads((root / name / "results.json").read_text()),
                                     rows=[json.loads(line) for line in (root / name / "generations.jsonl").open()])
    return SimpleNamespace(root=root, hundred=hundred, mixed=mixed, checkpoint=checkpoint, **done)


@pytest.mark.parametrize("name, counts", [("mixed_run", {"reverse": 3, "capitalize": 4}), ("whole", {"sort": 100})])
def test_a_user_file_of_n_records_is_scored_n_whatever_the_runs_cap(own, name, counts):
    run, file = getattr(own, name), own.mixed if name == "mixed_run" else own.hundred
    assert {task: values["samples"] for task, values in run.result["tasks"].items()} == counts
    assert run.result["split"] == "all" and run.result["scored"]["max_records_per_task"] is None
    assert run.result["scored"]["records"] == counts and run.result["scored"]["files"] == [str(file)]
    assert [(row["task"], row["instruction"], row["input"]) for row in run.rows] == \
        [(r.task, r.instruction, r.input) for r in load_records(file)]


def test_asking_for_a_split_rebuilds_the_runs_split_of_the_files_with_its_cap(own):
    expected = split_records(first_per_task(load_records(own.hundred), CAP), SEED)["test"]
    scored = [(row["instruction"], row["input"]) for row in own.split.rows]
    assert scored == [(r.instruction, r.input) for r in expected]
    assert own.split.result["scored"] == {"files": [str(own.hundred)], "split": "test", "seed": SEED,
                                          "max_records_per_task": CAP, "limit": None, "records": {"sort": 4}}


def test_what_is_scored_is_printed_first_and_put_in_results_md(own):
    whole = f"100 records of 1 task (sort 100) from {own.hundred}: all records, no split, no record cap"
    split = (f"4 records of 1 task (sort 4) from {own.hundred}: the run's test split (seed {SEED}), "
             f"the first {CAP} records per task before splitting (the run's cap)")
    mixed = f"7 records of 2 tasks (reverse 3, capitalize 4) from {own.mixed}: all records, no split, no record cap"
    for run, line in ((own.whole, whole), (own.split, split), (own.base, mixed)):
        assert run.printed.splitlines()[0] == f"hycam-eval: scoring {line}"
        assert (run.out / "results.md").read_text().startswith(f"Scored: {line}\n")


def test_the_runs_own_training_files_scored_whole_get_a_note(own):
    note = (f"hycam-eval: note: {own.hundred}: the run's training data, scored whole (--split test scores only the "
            "run's test split)")
    assert own.whole.printed.splitlines()[1] == note
    assert "note:" not in own.split.printed and "note:" not in own.mixed_run.printed


def test_one_checkpoints_tables_are_neither_bold_nor_captioned_with_seeds_or_tests(own):
    for run in (own.whole, own.base):
        markdown = (run.out / "results.md").read_text()
        assert "**" not in markdown and "std" not in markdown and "t-test" not in markdown
        assert markdown.count("\n\nOne run.\n") == 2  # the per-task table's caption and the average's


def test_each_scored_record_is_named_by_a_hash_of_its_text(own):
    expected = [hashlib.sha1("\x1f".join((r.task, r.instruction, r.input, r.output)).encode()).hexdigest()[:12]
                for r in load_records(own.mixed)]
    assert [row["id"] for row in own.mixed_run.result["records"]] == expected


@torch.no_grad()
def direct_scores(model_dir, records, max_new_tokens=3, max_length=200):
    """Per task (summed response NLL, tokens) one record at a time, and greedy decoding without cache."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    nll, predictions = {}, []
    for record in records:
        example = tokenize_record(record, tokenizer, max_length)
        log_probs = model(torch.tensor([example["input_ids"]])).logits[0].log_softmax(-1)
        scored = [-float(log_probs[t - 1, label]) for t, label in enumerate(example["labels"]) if label != -100]
        total, count = nll.get(record.task, (0.0, 0))
        nll[record.task] = (total + sum(scored), count + len(scored))
        ids = prompt_ids(record, tokenizer)
        new = []
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
        predictions.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return nll, predictions


def test_the_base_model_row_equals_a_direct_computation(own, tiny_model_dir, tmp_path):
    steps = ["--max-new-tokens", "12", "--dtype", "float32"]  # the direct computation runs in float32
    prompts = load_records(own.mixed)
    predictions = direct_scores(tiny_model_dir, prompts, max_new_tokens=12)[1]
    # references sharing most words with the generations, so that BLEU-4 and ROUGE-L are neither 0 nor 1
    records = [Record(r.task, r.instruction, r.input, f"{p} and then some") for r, p in zip(prompts, predictions)]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    argv = ["--base-model", str(tiny_model_dir), "--tasks", str(tmp_path / "refs.jsonl"), *FAST, *steps]
    assert run_main([*argv, "--output-dir", str(tmp_path / "out")])[0] == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").open()]
    nll = direct_scores(tiny_model_dir, records, max_new_tokens=12)[0]
    assert [row["prediction"] for row in rows] == predictions
    assert result["method"] == "base" and result["seed"] == 0
    assert result["checkpoint"] is None and result["base_model"] == str(tiny_model_dir)
    for task, values in result["tasks"].items():
        pairs = [(p, r.output) for p, r in zip(predictions, records) if r.task == task]
        assert values["ppl"] == pytest.approx(math.exp(nll[task][0] / nll[task][1]), rel=1e-6)
        assert values["response_tokens"] == nll[task][1]
        assert values["bleu"] == bleu4([p for p, _ in pairs], [o for _, o in pairs])
        assert values["rouge_l"] == rouge_l([p for p, _ in pairs], [o for _, o in pairs])
        assert 0 < values["bleu"] < 1 and 0 < values["rouge_l"] < 1


def test_the_base_model_and_a_trained_run_share_one_comparison_table(own, tmp_path):
    files = [own.base.out / "results.json", own.mixed_run.out / "results.json"]
    assert compare.main([*map(str, files), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert [run["method"] for run in summary["runs"]] == ["base", "hycam"]
    assert set(summary["overall"]["ppl"]["mean"]) == {"base", "hycam"}


def test_a_saved_dataset_is_scored_as_its_task_file(own, tiny_model_dir, tmp_path):
    datasets.Dataset.from_list([asdict(r) for r in load_records(own.mixed)]).save_to_disk(str(tmp_path / "saved"))
    argv = ["--base-model", str(tiny_model_dir), "--tasks", str(tmp_path / "saved"), *FAST]
    assert run_main([*argv, "--output-dir", str(tmp_path / "out")])[0] == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"] == own.base.result["tasks"]
    assert (tmp_path / "out" / "generations.jsonl").read_text() == (own.base.out / "generations.jsonl").read_text()


@pytest.mark.parametrize("argv", [[], ["--base-model", "MODEL"]])
def test_without_a_checkpoint_the_base_model_and_tasks_are_asked_for(argv, capsys):
    assert evaluate.main(argv) == 2
    assert error_line(capsys) == ("hycam-eval: error: pass --checkpoint RUN/best (a trained run), or --base-model "
                                  "MODEL with --tasks FILES (the untrained base model)")


def test_a_base_model_that_cannot_be_loaded_is_named(own, capsys):
    missing = own.root / "no-such-model"
    assert evaluate.main(["--base-model", str(missing), "--tasks", str(own.mixed), "--no-progress"]) == 2
    assert error_line(capsys).startswith(f"hycam-eval: error: cannot load base model {missing}: ")


def test_a_split_of_the_base_model_needs_a_seed(own, tiny_model_dir, capsys):
    argv = ["--base-model", str(tiny_model_dir), "--tasks", str(own.mixed), "--split", "test"]
    assert evaluate.main(argv) == 2
    assert error_line(capsys) == (f"hycam-eval: error: --base-model {tiny_model_dir}: no split seed is recorded; "
                                  "pass --seed to build the test split")
